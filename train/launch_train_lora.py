#!/usr/bin/env python3
"""Pod / cluster launcher for adapter training: the `meteora-jax train-lora` command as a script.

Run the same command on every host, as with train/launch_train_gate.py (see train/README.md).
"""

import sys

from meteora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]]))
