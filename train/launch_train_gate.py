#!/usr/bin/env python3
"""Pod / cluster launcher for MeteoRA gate training: the `meteora-jax train-gate` command as a script.

Run the same command on every host. On TPU pods and SLURM / Open MPI jobs the processes find
each other by themselves; elsewhere pass --coordinator HOST:PORT --num-processes N --process-id I.
See train/README.md.
"""

import sys

from meteora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-gate", *sys.argv[1:]]))
