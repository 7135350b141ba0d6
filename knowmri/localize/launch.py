"""Entry point for data-parallel runs: the `knowmri localize` / `knowmri enhance` command under `accelerate launch`.

    accelerate launch --num_processes 4 -m knowmri.localize.launch --model M --dataset gsm8k --out out/
    accelerate launch --cpu --num_processes 2 -m knowmri.localize.launch --model M --dataset emotion
    python -m knowmri.localize.launch enhance --model M --dataset emotion --out out/

The first argument may name the command (`localize`, the default, or `enhance`); the rest are
the command's options. Each process loads its own copy of the model (on its own GPU), takes
every world-th batch of samples, and the sums are reduced once; only the main process prints
and writes. The result equals a single-process run exactly (see `knowmri.localize.capability`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from knowmri.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("localize", "enhance"):
        args = ["localize", *args]
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
