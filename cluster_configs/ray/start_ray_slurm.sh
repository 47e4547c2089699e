#!/usr/bin/env bash
# Start a Ray cluster on the nodes of a SLURM allocation and run a Tune search on it.
#
#   salloc --nodes 4 --gpus-per-node 8 --ntasks-per-node 1 --cpus-per-task 64 --time 24:00:00
#   bash cluster_configs/ray/start_ray_slurm.sh --preset cuhk-pedes --gpus-per-trial 8 --num-samples 16
#
# or as a batch job, submitted from the repository root:
#   sbatch --nodes 4 --gpus-per-node 8 --ntasks-per-node 1 --cpus-per-task 64 \
#     cluster_configs/ray/start_ray_slurm.sh --preset cuhk-pedes --gpus-per-trial 8
#
# The first node runs the Ray head, every other node a Ray worker (one `srun` step each, with the
# node's CPUs and GPUs); once all have joined, tune/search.py runs here with --address and the
# arguments given. The cluster is token-authenticated with a token made for this job. When the
# search ends (or the job is cancelled) the Ray processes stop with their steps.
#
# Environment: RAY_PORT (head port, default 6379), RAY_TMPDIR (node-local root of Ray's temp
# folders, default /tmp/ray-$USER; each node uses <root>/<node>), RAY_CLUSTER_DIR (token and node
# logs, default runs/ray/job-$SLURM_JOB_ID: a folder every node sees), RAY_START_ARGS (more
# `ray start` options for every node), RAY_NODES_TIMEOUT_S (how long to wait for the nodes, 300).
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a SLURM allocation (salloc or sbatch)}"

# The repository: this script's, or (sbatch runs a copy of the script) the submission folder.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[[ -f $repo/tune/search.py ]] || repo=${SLURM_SUBMIT_DIR:-$PWD}
[[ -f $repo/tune/search.py ]] || { echo "error: run from the repository root (no tune/search.py in $repo)" >&2; exit 2; }
cd "$repo"

port=${RAY_PORT:-6379}
tmp_root=${RAY_TMPDIR:-/tmp/ray-$USER}
cluster_dir=${RAY_CLUSTER_DIR:-runs/ray/job-$SLURM_JOB_ID}
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
gpus=${SLURM_GPUS_ON_NODE:-0}
read -r -a extra <<< "${RAY_START_ARGS:-}"
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$head" hostname --ip-address | awk '{print $1}')

mkdir -p "$cluster_dir" && cluster_dir=$(cd "$cluster_dir" && pwd)
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$cluster_dir/auth_token")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$cluster_dir/auth_token  # the steps inherit them

start_node() {  # node, then ray start options
  local node=$1; shift
  srun --nodes=1 --ntasks=1 --overlap -w "$node" --output="$cluster_dir/$node.log" \
    ray start --block --temp-dir="$tmp_root/$node" --num-cpus="$cpus" --num-gpus="$gpus" \
      --disable-usage-stats "${extra[@]}" "$@" &
}
stop_nodes() { kill $(jobs -p) 2>/dev/null || true; wait || true; }
trap stop_nodes EXIT

echo "ray head: $head ($head_ip:$port); ${#nodes[@]} node(s) with $cpus CPU(s) and $gpus GPU(s) each; logs in $cluster_dir"
start_node "$head" --head --node-ip-address="$head_ip" --port="$port" --include-dashboard=false
for node in "${nodes[@]:1}"; do
  start_node "$node" --address="$head_ip:$port"
done

# Wait until every node has joined (a search started earlier would crowd the first ones).
nodes_up() {
  python - "$head_ip:$port" "${#nodes[@]}" <<'EOF'
import sys
import ray

try:
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
except Exception:  # (the head not up yet)
    sys.exit(1)
alive = sum(n["Alive"] for n in ray.nodes())
print(f"ray: {alive} node(s) up")
sys.exit(0 if alive >= int(sys.argv[2]) else 1)
EOF
}
deadline=$((SECONDS + ${RAY_NODES_TIMEOUT_S:-300}))
until nodes_up; do
  if (( $(jobs -r | wc -l) < ${#nodes[@]} )); then
    echo "error: a Ray node stopped; see $cluster_dir/<node>.log" >&2; exit 1
  fi
  if (( SECONDS > deadline )); then
    echo "error: not every Ray node joined within ${RAY_NODES_TIMEOUT_S:-300} s; see $cluster_dir/<node>.log" >&2
    exit 1
  fi
  sleep 2
done

python tune/search.py --address "$head_ip:$port" "$@"
