"""`meteora-jax demo --fast` end to end: every artefact, the stage cache, refusals.

One fast run (~45 s on 2 cores) is shared by the module; the two tests that rerun stages of it
come last.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from meteora_jax.cli import main
from meteora_jax.demo.stages import DemoRun, DemoSettings, run_demo
from meteora_jax.errors import ConfigError

FAST = DemoSettings.fast()
TASKS = sorted(FAST.base.tasks)
LORAS = [f"lora-{t}" for t in FAST.base.tasks]
EVALS = ["eval-peft", "eval-meteora", "eval-meteora-composite"]
STAGES = ["base", "composite", *LORAS, "gate", "gate-composite", *EVALS]
ROWS = ["base", "adapter", "meteora", "meteora-labelled", "merged"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--fast", "--no-progress", "--out", os.fspath(out)]) == 0
    return out


def test_results_json_has_the_issue_shape(demo):
    results = json.loads((demo / "report" / "results.json").read_text())
    assert set(results) == {"tasks", "composite", "routing", "self_check", "seconds"}
    assert sorted(results["tasks"]) == TASKS
    for row in results["tasks"].values():
        assert list(row) == ROWS
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert list(results["composite"]) == [f"composite-{n}" for n in FAST.composite_sizes]
    for composite in results["composite"].values():
        assert list(composite["fully_correct"]) == [
            "base",
            "adapter",
            "meteora",
            "meteora-labelled",
            "merged",
        ]
        assert all(0.0 <= v <= 1.0 for v in composite["fully_correct"].values())
        assert (
            set(composite["switch_accuracy"])
            == set(composite["switch_lag"])
            == {"meteora", "meteora-labelled"}
        )
    for figures in results["routing"].values():
        assert 0.0 <= figures["dominant_accuracy"] <= 1.0 and figures["per_projection"]
    assert set(results["self_check"]) == {*TASKS, *(f"composite-{n}" for n in FAST.composite_sizes)}
    assert set(results["self_check"].values()) == {1.0}  # the scoring can reach full marks
    assert list(results["seconds"]) == STAGES and all(s >= 0 for s in results["seconds"].values())


def test_report_folder_holds_the_tables_routing_view_and_curves(demo):
    report = demo / "report"
    text = (report / "report.md").read_text()
    assert "| task | base | adapter | meteora | meteora-labelled | merged |" in text
    assert "| fully correct |" in text and all(f"| sub-task {t} |" in text for t in TASKS)
    assert (
        all(f"composite-{n} prompts" in text for n in FAST.composite_sizes) and "| switch accuracy |" in text
    )
    assert "## Targets" in text and "## Seconds per stage" in text and "| layer 0 |" in text
    assert "Scoring self-check: gold answers score 1.0 for every task and composite." in text
    for task in TASKS:
        assert f"| {task} |" in text
    assert "<html" in (report / "routing.html").read_text().lower()
    for picture in ("routing.png", "routing-labelled.png"):
        assert (report / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = sorted(os.listdir(report / "curves"))
    assert curves == sorted(["gate.png", "gate-composite.png", *(f"lora-{t}.png" for t in TASKS)])
    assert all((report / "curves" / c).read_bytes()[:4] == b"\x89PNG" for c in curves)


def test_the_stages_wrote_a_peft_adapter_per_task_and_a_gate_checkpoint(demo):
    for task in TASKS:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(demo / "lora" / task))
    assert (demo / "setup" / "base" / "config.json").is_file()
    assert (demo / "gate-composite" / "metrics.jsonl").is_file()
    lines = (demo / "composite" / "composite.jsonl").read_text().splitlines()
    assert len(lines) == len(FAST.composite_sizes) * FAST.composite_sets * FAST.composite_samples
    assert all(json.loads(line)["prompt"].startswith("1. ") for line in lines)  # the numbered layout
    records = {s: json.loads((demo / "stages" / f"{s}.json").read_text()) for s in STAGES}
    assert all(r["done"] for r in records.values())


def test_a_rerun_skips_every_stage(demo, capsys):
    weights = demo / "lora" / TASKS[0] / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["demo", "--fast", "--no-progress", "--out", os.fspath(demo)]) == 0
    err = capsys.readouterr().err
    assert all(f"] {s}: cached" in err for s in STAGES)
    assert weights.stat().st_mtime_ns == before


def test_a_foreign_out_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["demo", "--fast", "--no-progress", "--out", os.fspath(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists and is not a demo folder" in err
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize("what", ["stages", "stages/base.json"])
def test_a_folder_with_a_stages_entry_of_its_own_is_refused(tmp_path, capsys, what):
    out = tmp_path / "mine"
    (out / "stages").mkdir(parents=True)
    if what.endswith(".json"):
        (out / what).write_text(json.dumps("key"))
    assert main(["demo", "--fast", "--no-progress", "--out", os.fspath(out)]) == 2
    assert f"--out {out} exists and is not a demo folder" in capsys.readouterr().err
    assert sorted(os.listdir(out / "stages")) == ([] if what == "stages" else ["base.json"])


def test_stage_keys_say_what_a_stage_does_not_where_the_folder_is(tmp_path):
    one, two = DemoRun(os.fspath(tmp_path / "a"), FAST), DemoRun(os.fspath(tmp_path / "b"), FAST)
    assert [s.settings for s in one.stages] == [s.settings for s in two.stages]
    gate = next(s for s in one.stages if s.name == "gate")
    assert gate.settings["out"] == "gate" and gate.settings["train"]["clip_norm"] == FAST.clip_norm
    assert "progress" not in gate.settings
    assert [s.name for s in one.stages] == STAGES


def test_the_gate_seed_reaches_both_gate_runs_and_nothing_else(tmp_path):
    """`--gate-seed`: both gate runs take it (gates' start, dropout, data order); every other stage
    keeps its key, so the base and the adapters stay cached."""
    zero = {s.name: s.settings for s in DemoRun(os.fspath(tmp_path), FAST).stages}
    seeded = {
        s.name: s.settings
        for s in DemoRun(os.fspath(tmp_path), dataclasses.replace(FAST, gate_seed=3)).stages
    }
    changed = {name for name in STAGES if zero[name] != seeded[name]}
    assert changed == {"gate", "gate-composite"}
    for name in changed:
        assert (zero[name]["train"]["seed"], zero[name]["data"]["seed"]) == (0, 0)
        assert (seeded[name]["train"]["seed"], seeded[name]["data"]["seed"]) == (3, 3)


def test_the_gate_routing_noise_reaches_the_paper_run_only(tmp_path):
    """`--gate-routing-noise`: the paper recipe's gate run takes it; no other stage's settings
    change (the labelled run reruns only because it starts from the paper run's gates)."""
    zero = {s.name: s.settings for s in DemoRun(os.fspath(tmp_path), FAST).stages}
    noisy = {
        s.name: s.settings
        for s in DemoRun(os.fspath(tmp_path), dataclasses.replace(FAST, gate_routing_noise=1.0)).stages
    }
    assert {name for name in STAGES if zero[name] != noisy[name]} == {"gate"}
    assert (zero["gate"]["train"]["routing_noise"], noisy["gate"]["train"]["routing_noise"]) == (0.0, 1.0)
    with pytest.raises(ConfigError, match=r"gate_routing_noise=-1 \(a number >= 0\)"):
        DemoSettings(gate_routing_noise=-1)


@pytest.mark.parametrize(
    ("flag", "says"), [("--gate-seed", "gate_seed=-1"), ("--gate-routing-noise", "gate_routing_noise=-1.0")]
)
def test_a_bad_gate_setting_is_refused_before_anything_is_written(tmp_path, capsys, flag, says):
    out = tmp_path / "run"
    assert main(["demo", "--fast", "--no-progress", flag, "-1", "--out", os.fspath(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not out.exists()


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"lora_steps=0 \(an integer >= 1\)"):
        DemoSettings(lora_steps=0)
    with pytest.raises(ConfigError, match=r"gate_lr=nan \(a number > 0\)"):
        DemoSettings(gate_lr=float("nan"))
    with pytest.raises(ConfigError, match=r"gate_seed=-1 \(an integer in \[0, 2\*\*32\)\)"):
        DemoSettings(gate_seed=-1)
    with pytest.raises(ConfigError, match=r"demo settings: lora_targets .*unknown target module qproj"):
        DemoSettings(lora_targets=("qproj", "v_proj"))
    with pytest.raises(ConfigError, match=r"composite_samples=9 is above the 8 test samples"):
        dataclasses.replace(FAST, composite_samples=9)
    with pytest.raises(ConfigError, match=r"composite-5 prompts need 5 tasks"):
        DemoSettings(base=dataclasses.replace(FAST.base, tasks=("reverse", "upper", "sort", "shift")))
    with pytest.raises(ConfigError, match=r"composite_sizes=\(3, 1\) \(distinct integers >= 2\)"):
        dataclasses.replace(FAST, composite_sizes=(3, 1))


def test_an_unfinished_stage_resumes_and_what_reads_it_reruns(demo, capsys):
    """A gate record left unfinished (as a kill leaves it): the gate run resumes in its folder (here
    from its last checkpoint), and what reads it (the labelled recipe and both MeteoRA
    evaluations) runs again."""
    record = demo / "stages" / "gate.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "done": False}))
    run_demo(os.fspath(demo), FAST, progress=False)
    err = capsys.readouterr().err
    assert "] gate: resuming" in err and "] eval-meteora: gate ran again, rebuilding" in err
    assert "] gate-composite: gate ran again, rebuilding" in err
    rerun = {"gate", "gate-composite", "eval-meteora", "eval-meteora-composite"}
    assert {s for s in STAGES if f"] {s}: cached" in err} == set(STAGES) - rerun
    assert json.loads(record.read_text())["done"]


def test_a_changed_setting_reruns_only_what_depends_on_it(demo, capsys):
    """More gate steps: the base, composites and adapters stay cached; both gate recipes and their
    evaluations rerun (the PEFT evaluation does not read the gates, so it stays cached too)."""
    run_demo(os.fspath(demo), dataclasses.replace(FAST, gate_steps=FAST.gate_steps + 2), progress=False)
    err = capsys.readouterr().err
    cached = {s for s in STAGES if f"] {s}: cached" in err}
    assert cached == {"base", "composite", *(f"lora-{t}" for t in TASKS), "eval-peft"}
    assert json.loads((demo / "stages" / "gate.json").read_text())["done"]
