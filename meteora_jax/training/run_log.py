"""What a training run tells its user: one-line messages, the metrics log (OUT/metrics.jsonl), the
progress bar and the loss curves. Only process 0 writes or prints; the others keep the records
(they decide nothing from them) and stay silent.
"""

from __future__ import annotations

import json
import os
import sys

from meteora_jax.io import files
from meteora_jax.training.curves import write_curves
from meteora_jax.training.distributed import is_main

METRICS_FILE, CURVES_FILE = "metrics.jsonl", "curves.png"


def log(command: str, message: str) -> None:
    """One line on stderr from process 0, prefixed by the command."""
    if is_main():
        print(f"meteora-jax {command}: {message}", file=sys.stderr, flush=True)


class RunLog:
    """The records of the run in OUT (one JSON object a line: a step's metrics, or an evaluation),
    the progress bar of `command` (when `progress`), and its messages."""

    def __init__(self, out: str, command: str, *, progress: bool):
        self.out = out
        self.command = command
        self.path = os.path.join(out, METRICS_FILE)
        self.records: list[dict] = []
        self.progress = progress and is_main()
        self.bar = None  # the progress bar while steps run (`start`, `close`)

    def say(self, message: str) -> None:
        log(self.command, message)

    def restore(self, step: int) -> None:
        """Takes up the logged records up to `step` (a resumed run goes on from there). A line that
        is not a JSON record (one cut by a kill, bytes that are not UTF-8) is left out, said once
        when it is not the last line."""
        self.records = self._read(step)

    def rewrite(self) -> None:
        """The log file holds exactly the records kept (none for a new run)."""
        if is_main():
            os.makedirs(self.out, exist_ok=True)
            files.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _read(self, step: int) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        records, bad, last = [], [], 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                last = number
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    record = None
                if not isinstance(record, dict):
                    bad.append(number)
                elif isinstance(record.get("step"), int) and record["step"] <= step:
                    records.append(record)
        if bad and bad != [last]:  # a last line cut by a kill needs no word
            self.say(f"{self.path}: line {bad[0]} ({len(bad)} lines in all) is not a JSON record; left out")
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        if is_main():
            with files.naming(self.path, unnamed_only=True), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {}

    def start(self, step: int, total: int) -> None:
        """Shows the progress bar at `step` of `total` steps (when the log shows one)."""
        if self.progress:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, initial=step, desc=self.command, unit="step", dynamic_ncols=True)

    def advance(self, **shown: str) -> None:
        """One step done, with `shown` beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix(**shown)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write_curves(self) -> None:
        if is_main():
            write_curves(self.records, os.path.join(self.out, CURVES_FILE))
