#!/usr/bin/env bash
# Start a Ray cluster inside a SLURM allocation and run a Tune search on it.
#
#   salloc --nodes 4 --gpus-per-node 8 --cpus-per-task 64 --ntasks-per-node 1 --time 24:00:00
#   bash cluster_configs/ray/start_ray_slurm.sh --preset cuhk-pedes --gpus-per-trial 8 --num-samples 16
#
# or as a batch job: sbatch --nodes 4 --gpus-per-node 8 --ntasks-per-node 1 --cpus-per-task 64 \
#   cluster_configs/ray/start_ray_slurm.sh --preset cuhk-pedes --gpus-per-trial 8
#
# The first node of the allocation runs the Ray head; every node runs one Ray worker daemon
# (srun, one task per node); then tune/search.py joins with --address and its arguments.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SLURM_JOB_NODELIST:?run inside a SLURM allocation (salloc or sbatch)}"
PORT=${RAY_PORT:-6379}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
gpus=${SLURM_GPUS_ON_NODE:-0}
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray-$USER}

echo "ray head: $head ($head_ip:$PORT), ${#nodes[@]} nodes, $cpus CPUs and $gpus GPUs each"
srun --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port="$PORT" --num-cpus="$cpus" --num-gpus="$gpus" --block &
sleep 10
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$head_ip:$PORT" --num-cpus="$cpus" --num-gpus="$gpus" --block &
done
sleep 10
python tune/search.py --address "$head_ip:$PORT" "$@"
