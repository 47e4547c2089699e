"""`python -m itself.retrieve ...`, or this file run as a script, which is how the DeepSpeed launcher
runs a program: `deepspeed --num_gpus 2 itself/retrieve/__main__.py index --model M ...`."""

import sys
from pathlib import Path

if not __package__:  # run as a file: import the package from this checkout, not this folder's modules as top-level ones
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from itself.retrieve.cli import main  # noqa: E402 - after the path fix above

if __name__ == "__main__":
    raise SystemExit(main())
