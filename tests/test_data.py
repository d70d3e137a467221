"""Training data: task folders, the shared encoding, labels, packing, sampling, hosts, resume."""

import collections
import json
import os

import numpy as np
import pytest

from meteora_jax.data import prompts
from meteora_jax.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from meteora_jax.data.samples import encode_sample, load_heldout
from meteora_jax.data.sampling import sample_sequence
from meteora_jax.data.tasks import Sample, load_tasks
from meteora_jax.errors import ConfigError
from meteora_jax.io.jsonl import read_jsonl

BOS, EOS = 1, 2
HEAD = "[INST] "  # format_prompt(p) = HEAD + p + TAIL
TAIL = " [/INST]\n"


class CharTokenizer:
    """One token per character (its code point), LLaMA-like BOS / EOS, for hand-checked ids."""

    def __init__(self, bos=BOS, eos=EOS):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


def chars(text):
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    texts = [prompts.format_prompt(f"add {i} and {i + 1}") + f"{2 * i + 1} apples" for i in range(30)]
    return prompts.train_tiny_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=120)


def write_task(root, name, lines, split="train"):
    """Writes DATA/<name>/<split>.jsonl; dict lines are JSON-encoded, strings written as they are."""
    os.makedirs(os.path.join(root, name), exist_ok=True)
    path = os.path.join(root, name, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def qa(prompt, response):
    return {"prompt": prompt, "response": response}


def seg(*pairs):
    return {"segments": [{"task": t, "text": x} for t, x in pairs]}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert list(x) == list(y) == list(BATCH_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def mixed_tasks(root, n_a=7, n_b=4):
    """Tasks a, b with samples of varied lengths, one segments sample in b."""
    write_task(root, "a", [qa("a" * (1 + i % 5), "r" * (i % 7)) for i in range(n_a)])
    write_task(
        root,
        "b",
        [qa("b" * (2 + i), "s" * (3 * i)) for i in range(n_b - 1)] + [seg(("a", "xy"), ("b", "zzz"))],
    )
    return load_tasks(root, ["a", "b"])


# ------------------------------------------------------------------------------ encoding


def test_encode_example_prompt_equals_generation_encoding(tiny_tokenizer):
    tok = tiny_tokenizer
    for prompt in ["add 2 and 3", "add 17 and 18 apples"]:
        ids, n_prompt = prompts.encode_example(tok, prompt, "5 apples")
        gen = prompts.encode_prompts(tok, [prompts.format_prompt(prompt)])
        assert ids[:n_prompt] == gen.input_ids[0].tolist()
        assert ids[0] == tok.bos_token_id  # the tiny tokenizer adds BOS, at training as at generation
        assert ids[n_prompt:] == tok("5 apples", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert prompts.encode_example(tok, prompt) == (ids[:n_prompt], n_prompt)


def test_encode_example_by_hand():
    ids, n_prompt = prompts.encode_example(CharTokenizer(), "q", "ok")
    assert ids == [BOS, *chars(HEAD + "q" + TAIL), *chars("ok"), EOS] and n_prompt == 18
    # No EOS in the tokenizer: nothing appended; no BOS: none added.
    assert prompts.encode_example(CharTokenizer(eos=None), "q", "ok") == (
        [BOS, *chars(HEAD + "q" + TAIL + "ok")],
        18,
    )
    assert prompts.encode_example(CharTokenizer(bos=None), "q")[0] == chars(HEAD + "q" + TAIL)


def test_encode_segments_by_hand(tiny_tokenizer):
    assert prompts.encode_segments(CharTokenizer(), ["ab", "c"]) == ([BOS, *chars("abc"), EOS], [3, 2])
    assert prompts.encode_segments(CharTokenizer(bos=None, eos=None), ["ab", "c"]) == (chars("abc"), [2, 1])
    ids, lengths = prompts.encode_segments(tiny_tokenizer, ["add 2", " apples"])
    assert ids[0] == BOS and ids[-1] == EOS and sum(lengths) == len(ids)
    assert ids.count(BOS) == 1


def test_sample_labels_and_lm_targets():
    tok = CharTokenizer()
    sample = Sample(label=3, prompt="q", response="ok")
    enc = encode_sample(tok, sample)
    assert enc["input_ids"].tolist() == [BOS, *chars(HEAD + "q" + TAIL), *chars("ok"), EOS]
    assert enc["gate_labels"].tolist() == [3] * 21 and enc["target_mask"].tolist() == [1] * 21
    resp = encode_sample(tok, sample, lm_loss="response")
    assert resp["target_mask"].tolist() == [0] * 18 + [1, 1, 1]  # "o", "k", EOS
    both = Sample(label=0, segments=((1, "ab"), (0, "c")))
    for lm_loss in ("all", "response"):
        enc = encode_sample(tok, both, lm_loss=lm_loss)
        assert enc["input_ids"].tolist() == [BOS, *chars("abc"), EOS]
        assert enc["gate_labels"].tolist() == [1, 1, 1, 0, 0]  # BOS with the first segment, EOS the last
        assert enc["target_mask"].tolist() == [1] * 5
    # A labelled composite: the response (LM targets under "response") follows the segment that
    # closes the chat template.
    chat = Sample(label=0, segments=((1, HEAD + "q"), (0, TAIL), (1, "o"), (0, "k")))
    assert encode_sample(tok, chat)["target_mask"].tolist() == [1] * 21
    enc = encode_sample(tok, chat, lm_loss="response")
    assert enc["input_ids"].tolist() == encode_sample(tok, sample)["input_ids"].tolist()
    assert enc["gate_labels"].tolist() == [1] * (1 + len(HEAD) + 1) + [0] * len(TAIL) + [1, 0, 0]
    assert enc["target_mask"].tolist() == [0] * 18 + [1, 1, 1]  # as the prompt / response sample


# ------------------------------------------------------------------------------ rows


def test_unpacked_row_by_hand(tmp_path):
    write_task(tmp_path, "a", [qa("q", "ok")])
    write_task(tmp_path, "b", [seg(("a", "xy"), ("b", "zzz"))])
    tasks = load_tasks(tmp_path, ["b", "a"])  # adapter order decides the labels: b=0, a=1
    assert list(tasks) == ["b", "a"]
    cfg = DataConfig(seq_len=24, batch_size=2, packing=False, lm_loss="response")
    batch = next(train_batches(tasks, CharTokenizer(), cfg))
    assert {k: v.dtype for k, v in batch.items()} == {
        **dict.fromkeys(BATCH_KEYS, np.dtype(np.int32)),
        "lm_weights": np.dtype(np.float32),
    }
    rows = {int(np.count_nonzero(batch["segment_ids"][r])): r for r in range(2)}  # sample length -> row
    qa_ids = [BOS, *chars(HEAD + "q" + TAIL + "ok"), EOS]
    r = rows[21]
    np.testing.assert_array_equal(batch["input_ids"][r], qa_ids + [EOS] * 3)  # padded with EOS (no pad id)
    np.testing.assert_array_equal(batch["segment_ids"][r], [1] * 21 + [0] * 3)
    np.testing.assert_array_equal(batch["positions"][r], list(range(21)) + [0] * 3)
    np.testing.assert_array_equal(batch["lm_targets"][r], qa_ids[1:] + [0] * 4)
    # Response only: slots 17..19 predict "o", "k", EOS.
    np.testing.assert_array_equal(batch["lm_weights"][r], [0] * 17 + [1, 1, 1] + [0] * 4)
    np.testing.assert_array_equal(batch["gate_labels"][r], [1] * 21 + [-1] * 3)
    r = rows[7]
    seg_ids = [BOS, *chars("xyzzz"), EOS]
    np.testing.assert_array_equal(batch["input_ids"][r][:7], seg_ids)
    np.testing.assert_array_equal(batch["segment_ids"][r], [1] * 7 + [0] * 17)
    np.testing.assert_array_equal(batch["lm_targets"][r], seg_ids[1:] + [0] * 18)
    np.testing.assert_array_equal(batch["lm_weights"][r], [1] * 6 + [0] * 18)  # segments: all tokens
    np.testing.assert_array_equal(batch["gate_labels"][r], [1, 1, 1, 0, 0, 0, 0] + [-1] * 17)


def test_packed_row_by_hand(tmp_path):
    write_task(tmp_path, "a", [seg(("a", "x" * n)) for n in (1, 2, 3)])  # 3, 4 and 5 tokens
    tasks = load_tasks(tmp_path, ["a"])
    cfg = DataConfig(seq_len=8, batch_size=1, packing_bins=1)
    order = [sample_sequence(tasks, seed=cfg.seed)[i] for i in range(2)]
    first, second = (encode_sample(CharTokenizer(), s)["input_ids"].tolist() for s in order)
    fits = len(first) + len(second) <= 8  # greedy: the second joins the row if it fits
    pieces = [first, second] if fits else [first]
    n = sum(len(p) for p in pieces)
    batch = next(train_batches(tasks, CharTokenizer(), cfg))
    np.testing.assert_array_equal(batch["input_ids"][0][:n], [i for p in pieces for i in p])
    np.testing.assert_array_equal(
        batch["segment_ids"][0], [s + 1 for s, p in enumerate(pieces) for _ in p] + [0] * (8 - n)
    )
    np.testing.assert_array_equal(
        batch["positions"][0], [t for p in pieces for t in range(len(p))] + [0] * (8 - n)
    )
    targets = [t for p in pieces for t in p[1:] + [0]]
    np.testing.assert_array_equal(batch["lm_targets"][0], targets + [0] * (8 - n))
    weights = [w for p in pieces for w in [1] * (len(p) - 1) + [0]]
    np.testing.assert_array_equal(batch["lm_weights"][0], weights + [0] * (8 - n))
    np.testing.assert_array_equal(batch["gate_labels"][0], [0] * n + [-1] * (8 - n))


def check_row(row, encodings):
    """Packed-row invariants; returns the (ids, labels) of each sample in the row."""
    ids, seg, pos = row["input_ids"], row["segment_ids"], row["positions"]
    n = int(np.count_nonzero(seg))
    assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at the end"
    assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    assert (row["gate_labels"][n:] == -1).all() and (row["gate_labels"][:n] >= 0).all()
    assert (row["lm_weights"][n:] == 0).all() and (row["lm_targets"][n:] == 0).all() and (pos[n:] == 0).all()
    found = []
    for s in range(1, int(seg.max()) + 1):
        (where,) = np.nonzero(seg == s)
        lo, hi = where[0], where[-1] + 1
        np.testing.assert_array_equal(pos[lo:hi], np.arange(hi - lo))
        np.testing.assert_array_equal(row["lm_targets"][lo : hi - 1], ids[lo + 1 : hi])
        assert row["lm_weights"][hi - 1] == 0 and row["lm_targets"][hi - 1] == 0, "no target across samples"
        key = (tuple(ids[lo:hi].tolist()), tuple(row["gate_labels"][lo:hi].tolist()))
        assert key in encodings, "every packed piece is a whole encoded sample"
        np.testing.assert_array_equal(row["lm_weights"][lo : hi - 1], encodings[key][1:])
        found.append(key)
    return found


@pytest.mark.parametrize("lm_loss", ["all", "response"])
def test_packed_rows_hold_every_sample_once_per_epoch(tmp_path, lm_loss):
    tok = CharTokenizer()
    tasks = mixed_tasks(tmp_path)
    encodings = {}
    for samples in tasks.values():
        for s in samples:
            e = encode_sample(tok, s, lm_loss=lm_loss)
            encodings[(tuple(e["input_ids"].tolist()), tuple(e["gate_labels"].tolist()))] = e["target_mask"]
    cfg = DataConfig(seq_len=64, batch_size=1, lm_loss=lm_loss, packing_bins=1)
    it = train_batches(tasks, tok, cfg)
    found = []
    while len(found) < 3 * 11:  # three epochs of the 11 samples, in one stream
        batch = next(it)
        row = {k: v[0] for k, v in batch.items()}
        found += check_row(row, encodings)
        assert it.last_stats.num_samples == int(row["segment_ids"].max())
        assert it.last_stats.num_tokens == int(np.count_nonzero(row["segment_ids"]))
    for epoch in range(3):
        assert collections.Counter(found[11 * epoch : 11 * (epoch + 1)]) == collections.Counter(
            dict.fromkeys(encodings, 1)
        )
    assert found[:11] != found[11:22], "each epoch is reshuffled"
    assert it.total_truncated == 0


def test_first_fit_packs_denser_than_unpacked(tmp_path):
    tasks = mixed_tasks(tmp_path)
    tok = CharTokenizer()
    tokens = {}
    for packing in (True, False):
        it = train_batches(tasks, tok, DataConfig(seq_len=96, batch_size=2, packing=packing))
        for _ in range(10):
            batch = next(it)
            if not packing:
                assert batch["segment_ids"].max() == 1
        tokens[packing] = sum(np.count_nonzero(next(it)["segment_ids"]) for _ in range(10))
    assert tokens[True] > 1.5 * tokens[False]


def test_truncation_is_counted(tmp_path):
    write_task(tmp_path, "a", [qa("q", "x" * 40), qa("q", "y"), qa("q" * 30, "z")])  # 60, 21, 49 tokens
    tasks = load_tasks(tmp_path, ["a"])
    tok = CharTokenizer()
    it = train_batches(tasks, tok, DataConfig(seq_len=32, batch_size=1, packing=False))
    seen = []
    for _ in range(6):  # two epochs
        batch = next(it)
        seen.append(it.last_stats.num_truncated)
        n = int(np.count_nonzero(batch["segment_ids"]))
        assert it.last_stats.num_truncated == (n == 32)
        assert batch["lm_weights"][0, n - 1] == 0
    assert sorted(seen) == [0, 0, 1, 1, 1, 1] and it.total_truncated == 4
    packed = train_batches(tasks, tok, DataConfig(seq_len=32, batch_size=2))
    total = 0
    for _ in range(9):
        next(packed)
        total += packed.last_stats.num_truncated
    assert total == packed.total_truncated >= 4  # 2 of every 3 samples are too long


# ------------------------------------------------------------------------------ sampling


def test_proportional_and_balanced_frequencies(tmp_path):
    write_task(tmp_path, "a", [qa(f"a{i}", "x") for i in range(30)])
    write_task(tmp_path, "b", [qa(f"b{i}", "y") for i in range(6)])
    tasks = load_tasks(tmp_path, ["a", "b"])
    prop = sample_sequence(tasks)
    for epoch in range(3):
        block = [prop[i] for i in range(36 * epoch, 36 * (epoch + 1))]
        assert set(block) == set(tasks["a"]) | set(tasks["b"]), "every sample once per epoch"
    bal = sample_sequence(tasks, task_sampling="balanced")
    labels = [bal[i].label for i in range(2 * 64 * 3)]
    assert labels.count(0) == labels.count(1)
    first = [bal[i] for i in range(300)]
    assert set(s for s in first if s.label == 1) == set(tasks["b"]), "the small task cycles through all"
    assert labels[:20] != [0, 1] * 10, "turns are shuffled"
    # Through the batches: samples start where positions are 0 on a real token.
    for sampling, share in (("proportional", 30 / 36), ("balanced", 0.5)):
        it = train_batches(
            tasks, CharTokenizer(), DataConfig(seq_len=64, batch_size=4, task_sampling=sampling)
        )
        counts = collections.Counter()
        for batch in take(it, 40):
            starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
            counts.update(batch["gate_labels"][starts].tolist())
        assert abs(counts[0] / (counts[0] + counts[1]) - share) < 0.06, (sampling, counts)


def test_seed_determines_batches(tmp_path):
    tasks = mixed_tasks(tmp_path)
    tok = CharTokenizer()
    cfg = DataConfig(seq_len=48, batch_size=2, task_sampling="balanced", seed=7)
    assert_batches_equal(take(train_batches(tasks, tok, cfg), 6), take(train_batches(tasks, tok, cfg), 6))
    other = DataConfig(seq_len=48, batch_size=2, task_sampling="balanced", seed=8)
    a, b = take(train_batches(tasks, tok, cfg), 6), take(train_batches(tasks, tok, other), 6)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ hosts and resume


@pytest.mark.parametrize("sampling", ["proportional", "balanced"])
def test_global_batch_independent_of_process_count(tmp_path, sampling):
    tasks = mixed_tasks(tmp_path)
    tok = CharTokenizer()
    cfg = DataConfig(seq_len=40, batch_size=4, task_sampling=sampling)
    steps = 8  # several epochs of the 11 samples
    single = take(train_batches(tasks, tok, cfg), steps)
    for count in (2, 4):
        hosts = [train_batches(tasks, tok, cfg, process_index=p, process_count=count) for p in range(count)]
        per_host = [take(h, steps) for h in hosts]
        assert all(b["input_ids"].shape == (4 // count, 40) for b in per_host[0])
        joined = [{k: np.concatenate([h[s][k] for h in per_host]) for k in BATCH_KEYS} for s in range(steps)]
        assert_batches_equal(single, joined)


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(seq_len=40, batch_size=2),
        DataConfig(seq_len=40, batch_size=2, task_sampling="balanced", packing_bins=1, seed=3),
        DataConfig(seq_len=40, batch_size=3, packing=False, lm_loss="response"),
    ],
    ids=["first-fit", "balanced-greedy", "unpacked"],
)
def test_state_resumes_exactly_across_epochs(tmp_path, cfg):
    tasks = mixed_tasks(tmp_path)
    tok = CharTokenizer()
    reference = train_batches(tasks, tok, cfg)
    straight = take(reference, 14)  # about 5 epochs of the 11 samples
    states, it = [], train_batches(tasks, tok, cfg)
    for _ in range(14):
        states.append(json.loads(json.dumps(it.get_state())))
        next(it)
    for k in (0, 1, 3, 5, 8, 13):
        resumed = train_batches(tasks, tok, cfg)
        resumed.set_state(states[k])
        assert resumed.steps == k
        assert_batches_equal(take(resumed, 14 - k), straight[k:])
    assert resumed.total_truncated == reference.total_truncated


def test_prefetch_thread_gives_the_same_batches_and_states(tmp_path):
    tasks = mixed_tasks(tmp_path)
    cfg = DataConfig(seq_len=40, batch_size=2)
    straight = take(train_batches(tasks, CharTokenizer(), cfg), 10)
    it = train_batches(tasks, CharTokenizer(), cfg, prefetch=2)
    assert_batches_equal(take(it, 4), straight[:4])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = train_batches(tasks, CharTokenizer(), cfg, prefetch=3)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), straight[4:])
    resumed.close()


def test_state_of_one_host_resumes_that_host(tmp_path):
    tasks = mixed_tasks(tmp_path)
    tok = CharTokenizer()
    cfg = DataConfig(seq_len=40, batch_size=4)
    host = train_batches(tasks, tok, cfg, process_index=1, process_count=2)
    take(host, 5)
    state = json.loads(json.dumps(host.get_state()))
    following = take(host, 4)
    again = train_batches(tasks, tok, cfg, process_index=1, process_count=2)
    again.set_state(state)
    assert_batches_equal(take(again, 4), following)
    single = train_batches(tasks, tok, cfg)
    with pytest.raises(ConfigError, match="process_count"):
        single.set_state(state)
    with pytest.raises(ConfigError, match="seq_len"):
        train_batches(
            tasks, tok, DataConfig(seq_len=41, batch_size=4), process_index=1, process_count=2
        ).set_state(state)


# ------------------------------------------------------------------------------ held-out data


def test_heldout_prompts_match_generation(tmp_path, tiny_tokenizer):
    write_task(tmp_path, "a", [qa("add 1 and 2", "3 apples")], split="test")
    write_task(tmp_path, "b", [qa("add 4 and 5", "9"), seg(("a", "add 2"), ("b", " apples"))], split="test")
    held = load_heldout(tmp_path, ["b", "a"], tiny_tokenizer)
    assert list(held) == ["b", "a"]
    (a0,) = held["a"]
    gen = prompts.encode_prompts(tiny_tokenizer, [prompts.format_prompt("add 1 and 2")])
    assert a0.input_ids.tolist() == gen.input_ids[0].tolist() and a0.response == "3 apples"
    assert (a0.gate_labels == 1).all() and a0.input_ids.dtype == np.int32
    b0, b1 = held["b"]
    assert (b0.gate_labels == 0).all() and b0.where.endswith("test.jsonl line 1")
    ids, lengths = prompts.encode_segments(tiny_tokenizer, ["add 2", " apples"])
    assert b1.input_ids.tolist() == ids and b1.gate_labels.tolist() == [1] * lengths[0] + [0] * lengths[1]
    full = load_heldout(tmp_path, ["b", "a"], tiny_tokenizer, tasks=["a"], with_response=True)
    assert list(full) == ["a"]
    assert (
        full["a"][0].input_ids.tolist()
        == prompts.encode_example(tiny_tokenizer, "add 1 and 2", "3 apples")[0]
    )


# ------------------------------------------------------------------------------ bad input


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"prompt": "q", "response": ', ["not valid JSON"]),
        ('["q", "r"]', ["expected an object"]),
        ('{"prompt": "q"}', ['missing "response"']),
        ('{"response": "r"}', ['missing "prompt"']),
        ('{"prompt": 3, "response": "r"}', ['"prompt" must be a string', "int"]),
        ('{"segments": [{"task": "c", "text": "x"}]}', ["segment 0", "'c' is not an adapter", "a, b"]),
        ('{"segments": [{"task": "a", "text": "x"}, {"task": "b"}]}', ["segment 1", 'missing "text"']),
        ('{"segments": []}', ['"segments" must be a non-empty list']),
        ('{"segments": [{"task": "a", "text": ""}]}', ['"text" is empty']),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, words):
    write_task(tmp_path, "a", [qa("q", "r")])
    path = write_task(tmp_path, "b", [qa("q", "r"), "", line])
    message = error_of(load_tasks, tmp_path, ["a", "b"])
    assert f"{path} line 3" in message
    for w in words:
        assert w in message


def test_bad_folders(tmp_path):
    assert "does not exist" in error_of(load_tasks, tmp_path / "nope", ["a"])
    write_task(tmp_path, "a", [qa("q", "r")])
    write_task(tmp_path, "x", [qa("q", "r")])
    write_task(tmp_path, "y", [qa("q", "r")])
    message = error_of(load_tasks, tmp_path, ["a", "b", "c"])
    assert "without an adapter: x, y" in message and "without a task folder: b, c" in message
    message = error_of(load_tasks, tmp_path, ["a", "b"], tasks=["a", "z", "b"])
    assert "not adapters: z" in message and "without a folder: z, b" in message
    assert set(load_tasks(tmp_path, ["a", "x", "b"], tasks=["x", "a"])) == {"a", "x"}
    message = error_of(load_tasks, tmp_path, ["a", "x", "y"], split="test")
    assert "missing split files" in message and os.path.join(str(tmp_path), "a", "test.jsonl") in message
    empty = write_task(tmp_path, "y", ["", "  "])
    message = error_of(load_tasks, tmp_path, ["a", "x", "y"])
    assert empty in message and "holds no samples" in message
    assert "repeats a" in error_of(load_tasks, tmp_path, ["a", "x", "a"])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"seq_len": 1}, ["seq_len"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"lm_loss": "prompt"}, ["lm_loss", "prompt"]),
        ({"task_sampling": "uniform"}, ["task_sampling", "uniform"]),
        ({"seed": -1}, ["seed"]),
        ({"packing": 1}, ["packing"]),
        ({"packing_bins": 0}, ["packing_bins"]),
    ],
)
def test_bad_config(kwargs, words):
    message = error_of(DataConfig, **{"seq_len": 16, "batch_size": 2, **kwargs})
    assert all(w in message for w in words)


def test_batch_size_must_divide_over_processes(tmp_path):
    write_task(tmp_path, "a", [qa("q", "r")])
    tasks = load_tasks(tmp_path, ["a"])
    message = error_of(
        train_batches, tasks, CharTokenizer(), DataConfig(16, 6), process_index=0, process_count=4
    )
    assert "batch_size 6" in message and "process count 4" in message
    assert "process_index" in error_of(
        train_batches, tasks, CharTokenizer(), DataConfig(16, 4), process_index=2, process_count=2
    )


def test_jsonl_lines_with_a_byte_order_mark_and_crlf_read_as_written(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "c", "response": "d"}\r\n'
    )
    assert list(read_jsonl(path)) == [
        (f"{path} line 1", {"prompt": "a", "response": "b"}),
        (f"{path} line 3", {"prompt": "c", "response": "d"}),
    ]
