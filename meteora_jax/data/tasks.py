"""Task folders: `DATA/<task>/<split>.jsonl`, read, validated and matched to adapters by name.

Each line of a split file is one sample, either `{"prompt": ..., "response": ...}` (every token
labelled with the folder's task) or `{"segments": [{"task": T, "text": ...}, ...]}` (one sample
whose tokens switch task; each segment is labelled with its own task T, an adapter name). A label
is the task's adapter index, its position in the adapter order the gates use. Every problem is a
one-line `ConfigError` naming the file and line (or the folders) at fault.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from meteora_jax.data.prompts import read_as_inputs
from meteora_jax.errors import ConfigError
from meteora_jax.io.jsonl import read_jsonl


@dataclasses.dataclass(frozen=True)
class Sample:
    """One line of a task file.

    `label` is the adapter index of the folder's task. A segments sample has `segments`
    ((adapter index, text), ...) and no prompt / response. `where` is "FILE line N".
    """

    label: int
    prompt: str | None = None
    response: str | None = None
    segments: tuple[tuple[int, str], ...] | None = None
    where: str = ""


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def _check_adapter_names(adapter_names: Sequence[str]) -> list[str]:
    names = list(adapter_names)
    if isinstance(adapter_names, str) or not names:
        raise ConfigError("adapter_names must be a non-empty list of adapter names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"adapter_names repeats {_names(duplicates)}")
    return names


def _select_tasks(data_dir: str, adapters: list[str], tasks: Sequence[str] | None) -> list[str]:
    """The task names to read, in adapter order, after matching folders and adapters."""
    folders = sorted(
        e for e in os.listdir(data_dir) if not e.startswith(".") and os.path.isdir(os.path.join(data_dir, e))
    )
    if tasks is None:
        chosen, hint = adapters, "; pass tasks=[...] to train on a subset"
        unmatched = {
            "task folders without an adapter": [f for f in folders if f not in adapters],
            "adapters without a task folder": [a for a in adapters if a not in folders],
        }
    else:
        chosen, hint = list(tasks), ""
        if isinstance(tasks, str) or not chosen or len(set(chosen)) != len(chosen):
            raise ConfigError(f"tasks must be a non-empty list of distinct task names, got {tasks!r}")
        unmatched = {
            "tasks that are not adapters": [t for t in chosen if t not in adapters],
            "tasks without a folder": [t for t in chosen if t not in folders],
        }
    if any(unmatched.values()):
        listed = "; ".join(f"{what}: {_names(names)}" for what, names in unmatched.items())
        raise ConfigError(f"data dir {data_dir}: {listed} (adapters: {_names(adapters)}{hint})")
    return [a for a in adapters if a in chosen]


def _string_field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise ConfigError(f'{where}: missing "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise ConfigError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    return value


def _parse_segments(segments, where: str, adapters: list[str]) -> tuple[tuple[int, str], ...]:
    if not isinstance(segments, list) or not segments:
        raise ConfigError(f'{where}: "segments" must be a non-empty list of {{"task": ..., "text": ...}}')
    parsed = []
    for i, segment in enumerate(segments):
        at = f"{where} segment {i}"
        if not isinstance(segment, dict):
            raise ConfigError(f'{at}: expected an object with string "task" and "text"')
        task, text = _string_field(segment, "task", at), _string_field(segment, "text", at)
        if task not in adapters:
            raise ConfigError(f"{at}: task {task!r} is not an adapter (adapters: {_names(adapters)})")
        if not text:
            raise ConfigError(f'{at}: "text" is empty')
        parsed.append((adapters.index(task), text))
    return tuple(parsed)


def _parse_line(record, where: str, label: int, adapters: list[str]) -> Sample:
    if not isinstance(record, dict):
        raise ConfigError(f'{where}: expected an object with "prompt" and "response", or "segments"')
    if "segments" in record:
        if "prompt" in record or "response" in record:
            raise ConfigError(f'{where}: has "segments" and also "prompt" / "response"; use one form')
        return Sample(label, segments=_parse_segments(record["segments"], where, adapters), where=where)
    prompt = _string_field(record, "prompt", where)
    return Sample(label, prompt=prompt, response=_string_field(record, "response", where), where=where)


def read_task_file(path: str, label: int, adapter_names: Sequence[str]) -> tuple[Sample, ...]:
    """The samples of one split file (blank lines skipped), each labelled `label`."""
    adapters = list(adapter_names)
    samples = [_parse_line(record, where, label, adapters) for where, record in read_jsonl(path)]
    if not samples:
        raise ConfigError(f"{path}: task {adapters[label]!r} holds no samples")
    return _unformatted(samples, path)


def _unformatted(samples: list[Sample], path: str) -> tuple[Sample, ...]:
    """`samples` with prompts already in the instruction format (the reference's task files)
    read as their input (`read_as_inputs`), so every command wraps them once."""
    prompts = [s.prompt for s in samples if s.prompt is not None]
    inputs = iter(read_as_inputs(prompts, path))
    return tuple(s if s.prompt is None else dataclasses.replace(s, prompt=next(inputs)) for s in samples)


def load_tasks(
    data_dir: str | os.PathLike,
    adapter_names: Sequence[str],
    *,
    tasks: Sequence[str] | None = None,
    split: str = "train",
) -> dict[str, tuple[Sample, ...]]:
    """The samples of `DATA/<task>/<split>.jsonl` per task name, in adapter order.

    Every adapter needs a task folder and every folder an adapter, unless `tasks` (a subset of
    the adapter names) is given: then exactly those folders are read. Labels are adapter indices.

    Raises:
        ConfigError: a missing data dir or split file, folders and adapters that do not match
            (all named at once), an empty task, or a bad line (file and line number).
    """
    data_dir = os.fspath(data_dir)
    adapters = _check_adapter_names(adapter_names)
    if not isinstance(split, str) or not split or os.sep in split:
        raise ConfigError(f"split must be a file stem such as 'train' or 'test', got {split!r}")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data dir {data_dir} does not exist (expected DATA/<task>/{split}.jsonl folders)")
    selected = _select_tasks(data_dir, adapters, tasks)
    paths = {t: os.path.join(data_dir, t, f"{split}.jsonl") for t in selected}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"split {split!r}: missing split files: {_names(missing)}")
    return {t: read_task_file(p, adapters.index(t), adapters) for t, p in paths.items()}
