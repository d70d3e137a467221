"""Generation: greedy parity with transformers (base) and the torch MeteoRA statement (routed),
cached decode vs full forward, sampling, forced adapters, EOS, n-gram bans, compilation counts,
bad settings, text in / text out and the `generate` command.

One tiny GQA base, three PEFT adapters with different targets and ranks, and the fused model's
random gates. Prompts of different lengths are left padded; every parity test runs >= 20 new
tokens. Programs are shared between tests (same batch, bucket and static switches), so the
file compiles only a handful of times.
"""

import json

import numpy as np
import pytest
import torch
from conftest import make_hf_model, make_peft_adapter, max_abs, torch_meteora_model

import meteora_jax as mj
from meteora_jax import generation as gen
from meteora_jax.commands import generate as generate_command
from meteora_jax.config import PROJECTIONS
from meteora_jax.data import prompts
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.generation import generate

NEW = 24
LENGTHS = (5, 13, 9)  # one bucket (16); row 0 is the shortest, so it is padded most
PAD = 0
TOL = 1e-4
ROUTED = dict(return_routing=True, output_logits=True)  # one program for the routed-model tests
ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "every": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "mlp": dict(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
TEXTS = [
    "[INST] add the numbers 2 and 3 [/INST]\n 5",
    "[INST] translate to german: good morning [/INST]\n guten Morgen",
    "[INST] is the sky green? [/INST]\n no, the sky is blue.",
    "the cat sat on the mat, and the dog sat on the log.",
    "Translate the sentence into Spanish and Italian, then count the words.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    hf, base_dir = make_hf_model(root / "base")
    dirs = {
        name: make_peft_adapter(base_dir, root / name, seed=i + 1, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    prompts.train_tiny_tokenizer(TEXTS * 4, base_dir, vocab_size=200)
    return hf, base_dir, dirs


@pytest.fixture(scope="module")
def base(setup):
    return mj.load_model(setup[1])


@pytest.fixture(scope="module")
def fused(setup):
    with pytest.warns(UserWarning, match="untrained"):
        return mj.load_model(setup[1], adapters=setup[2], top_k=2)


def gates_of(model) -> dict:
    """(layer, projection) -> gate (in, L) read out of a fused meteora_jax model."""
    gates = {}
    for proj in model.moe.targets:
        block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
        stacked = np.asarray(getattr(getattr(model.module.layers, block), proj).gate[...])
        gates.update({(layer, proj): stacked[layer] for layer in range(stacked.shape[0])})
    return gates


def left_padded(lengths=LENGTHS, seed=0, vocab=211):
    """A left-padded batch of random prompts (ids avoid 0-2: pad / BOS / EOS)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(3, vocab, n)
        mask[row, width - n :] = 1
    return ids, mask


def torch_generate(model, ids, mask, new=NEW, **kw):
    """transformers greedy generation; returns (B, P + new) numpy ids."""
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=0,
            pad_token_id=PAD,
            **kw,
        )
    got = out.numpy()
    return np.pad(got, ((0, 0), (0, ids.shape[1] + new - got.shape[1])), constant_values=PAD)


def ours(model, ids, mask, **kw):
    kw.setdefault("eos_token_id", [])
    out = generate(model, ids, max_new_tokens=kw.pop("new", NEW), attention_mask=mask, pad_token_id=PAD, **kw)
    return out


def test_greedy_base_equals_transformers(setup, base):
    hf = setup[0]
    ids, mask = left_padded()
    out = ours(base, ids, mask)
    want = torch_generate(hf, ids, mask)
    assert out.sequences.shape == (3, max(LENGTHS) + NEW)
    np.testing.assert_array_equal(np.asarray(out.sequences), want)
    np.testing.assert_array_equal(
        np.asarray(out.attention_mask), np.concatenate([mask, np.ones((3, NEW))], 1)
    )
    np.testing.assert_array_equal(out.num_new_tokens, [NEW] * 3)


def test_greedy_routed_equals_torch_statement(setup, fused):
    _, base_dir, dirs = setup
    torch_fused = torch_meteora_model(
        base_dir, list(dirs.values()), gates_of(fused), top_k=2, temperature=1.0
    )
    ids, mask = left_padded(seed=1)
    out = ours(fused, ids, mask, **ROUTED)
    np.testing.assert_array_equal(np.asarray(out.sequences), torch_generate(torch_fused, ids, mask))
    base_out = ours(mj.load_model(base_dir), ids, mask)
    assert np.any(np.asarray(base_out.sequences) != np.asarray(out.sequences)), "the adapters must matter"


def test_cached_decode_equals_full_forward(fused, record_error):
    """Step logits and the routing trace of every token equal one forward pass over the result."""
    ids, mask = left_padded(seed=2)
    out = ours(fused, ids, mask, **ROUTED, routing_temperature=2.0)
    p = out.prompt_length
    full = fused(
        np.asarray(out.sequences),
        attention_mask=np.asarray(out.attention_mask),
        return_routing=True,
        temperature=2.0,
    )
    logits = np.asarray(full.logits)[:, p - 1 : -1]
    err = record_error("cached decode vs full forward, logits", max_abs(out.logits, logits))
    assert err <= TOL
    np.testing.assert_array_equal(np.asarray(out.new_tokens), np.argmax(logits, -1))
    real = np.asarray(out.attention_mask).astype(bool)
    assert set(out.routing) == set(full.routing)
    worst = 0.0
    for key, r in out.routing.items():
        want = full.routing[key]
        np.testing.assert_array_equal(np.asarray(r.ids)[real], np.asarray(want.ids)[real], err_msg=key)
        worst = max(worst, max_abs(np.asarray(r.weights)[real], np.asarray(want.weights)[real]))
        assert np.all(np.asarray(r.weights)[~real] == 0), "padding carries no routing weight"
    assert record_error("cached decode vs full forward, routing weights", worst) <= TOL


def test_sampling_is_reproducible_and_filtered(base):
    ids, mask = left_padded(seed=3)
    kw = dict(temperature=0.8, top_p=0.9, top_k=5, output_logits=True)
    a, b = ours(base, ids, mask, seed=1, **kw), ours(base, ids, mask, seed=1, **kw)
    c = ours(base, ids, mask, seed=2, **kw)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
    assert np.any(np.asarray(a.sequences) != np.asarray(c.sequences)), "another seed must change the samples"
    greedy = np.argmax(np.asarray(a.logits), -1)
    assert np.any(np.asarray(a.new_tokens) != greedy), "sampling at temperature 0.8 should leave greedy"
    # Every draw lies in the nucleus of its top-5 filtered, tempered distribution.
    logits = np.asarray(a.logits, np.float64) / 0.8
    order = np.argsort(-logits, -1)[..., :5]
    top = np.take_along_axis(logits, order, -1)
    probs = np.exp(top - top.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    in_nucleus = (np.cumsum(probs, -1) - probs) < 0.9
    chosen = order == np.asarray(a.new_tokens)[..., None]
    assert np.all(np.any(chosen & in_nucleus, -1))
    # The same program decodes greedily at temperature 0, and a tiny top_p leaves only the best token.
    for extra in (dict(temperature=0.0), dict(top_p=1e-6)):
        g = ours(base, ids, mask, seed=1, **{**kw, **extra})
        np.testing.assert_array_equal(np.asarray(g.new_tokens), np.argmax(np.asarray(g.logits), -1))


def test_filters_equal_transformers_warpers():
    import transformers

    logits = np.random.default_rng(0).normal(size=(4, 97)).astype(np.float32) * 3
    logits[3, :3] = 10.0  # three tokens tied for the top
    for top_p in (0.05, 0.5, 0.9, 0.999, 1.0):
        want = np.isinf(transformers.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy())
        got = np.isinf(np.asarray(gen.top_p_filter(logits, np.float32(top_p))))
        np.testing.assert_array_equal(got[:3], want[:3], err_msg=f"top_p={top_p}")
        # Ties break by sort order (torch's sort is not stable); the kept count must agree.
        np.testing.assert_array_equal(got.sum(-1), want.sum(-1), err_msg=f"top_p={top_p}")


def test_sampling_frequencies_follow_the_filtered_softmax():
    import jax

    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
    sampling = gen.SamplingArrays.of(gen.GenerationSettings(1, temperature=1.0, top_p=0.8, top_k=4), 5)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: gen._sample(logits, k, sampling))(keys))[:, 0]
    freq = np.bincount(draws, minlength=5) / len(draws)
    want = np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85  # nucleus 0.8 keeps the three most likely
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_forced_adapters_equal_single_adapter_peft(setup, fused):
    """adapter_ids pins each row to one adapter (-1: none), like PEFT's mixed-batch adapter_names."""
    import peft
    import transformers

    _, base_dir, dirs = setup
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(hf, dirs["attn"], adapter_name="attn")
    reference.load_adapter(dirs["mlp"], adapter_name="mlp")
    reference.eval()
    ids, mask = left_padded(seed=4)
    names = fused.adapter_names
    out = ours(fused, ids, mask, adapter_ids=[names.index("attn"), -1, names.index("mlp")])
    want = torch_generate(reference, ids, mask, adapter_names=["attn", "__base__", "mlp"])
    np.testing.assert_array_equal(np.asarray(out.sequences), want)


def test_eos_stops_each_row(setup, base):
    hf = setup[0]
    ids, mask = left_padded()
    free = np.asarray(ours(base, ids, mask).sequences)
    p = ids.shape[1]
    eos = int(free[0, p + 3])
    out = ours(base, ids, mask, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(out.sequences), torch_generate(hf, ids, mask, eos_token_id=eos))
    for row in range(3):
        hits = np.nonzero(free[row, p:] == eos)[0]
        stop = hits[0] + 1 if len(hits) else NEW
        assert out.num_new_tokens[row] == stop
        np.testing.assert_array_equal(np.asarray(out.new_tokens)[row, :stop], free[row, p : p + stop])
        assert np.all(np.asarray(out.new_tokens)[row, stop:] == PAD)
    # Every row stops early: the loop ends, the output keeps its full width.
    eos_all = [int(free[row, p + 2 + row]) for row in range(3)]
    out = ours(base, ids, mask, eos_token_id=eos_all)
    assert out.sequences.shape == (3, p + NEW) and out.num_new_tokens.max() <= 5
    np.testing.assert_array_equal(
        np.asarray(out.sequences), torch_generate(hf, ids, mask, eos_token_id=eos_all)
    )


def test_no_repeat_ngram_equals_transformers(setup, base):
    hf = setup[0]
    ids, mask = left_padded(seed=5)
    free = np.asarray(ours(base, ids, mask).sequences)
    bigrams = [list(zip(row[:-1], row[1:], strict=True)) for row in free[:, -NEW - 1 :]]
    assert any(len(set(b)) < len(b) for b in bigrams), "the test needs a repeated bigram to ban"
    out = np.asarray(ours(base, ids, mask, no_repeat_ngram_size=2).sequences)
    np.testing.assert_array_equal(out, torch_generate(hf, ids, mask, no_repeat_ngram_size=2))
    assert np.any(out != free)


def test_no_recompilation_per_token_length_or_setting(base, fused):
    """One program per (batch, bucket, max_new_tokens, static switches), whatever else changes.

    Sizes are read after a first call, so programs compiled by other tests do not matter.
    """
    cache_size = gen._generate_program._cache_size
    ours(base, *left_padded())
    compiled = cache_size()
    for lengths, temperature, top_p, seed in (((16, 2, 3), 0.7, 0.9, 1), ((1, 1, 11), 1.3, 0.5, 2)):
        ids, mask = left_padded(lengths, seed=seed)
        ours(base, ids, mask, temperature=temperature, top_p=top_p, seed=seed, eos_token_id=[7])
    assert cache_size() == compiled, "a prompt length in the bucket or a sampling value recompiled"
    ours(fused, *left_padded(), **ROUTED)
    compiled = cache_size()
    for routing_temperature in (0.5, 30.0):
        ours(fused, *left_padded(seed=9), **ROUTED, routing_temperature=routing_temperature, temperature=0.5)
    assert cache_size() == compiled, "the routing temperature recompiled"
    ours(base, *left_padded((40, 3, 4)))  # another bucket (64, used by no other test): one more program
    assert cache_size() == compiled + 1
    assert [gen.prompt_bucket(n) for n in (1, 16, 17, 512, 513, 1100)] == [16, 16, 32, 512, 1024, 1536]


def test_streaming_steps_equal_the_batch_loop(base):
    """on_token runs the same step program from the host: same tokens, one compile for all steps."""
    seen = []
    for lengths, temperature in (((5, 13, 9), 0.0), ((2, 2, 16), 0.9)):
        ids, mask = left_padded(lengths)
        batch = ours(base, ids, mask, temperature=temperature, seed=3, eos_token_id=[9])
        if not seen:
            steps = gen.step_program._cache_size()
        seen.clear()
        streamed = ours(
            base,
            ids,
            mask,
            temperature=temperature,
            seed=3,
            eos_token_id=[9],
            on_token=lambda t, live: seen.append(t),
        )
        np.testing.assert_array_equal(np.asarray(streamed.sequences), np.asarray(batch.sequences))
        assert len(seen) == streamed.num_new_tokens.max()
        np.testing.assert_array_equal(np.stack(seen, 1), np.asarray(streamed.new_tokens)[:, : len(seen)])
    assert gen.step_program._cache_size() <= steps + 1


BAD_SETTINGS = [
    (dict(max_new_tokens=0), ConfigError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), ConfigError, "max_new_tokens must be an integer"),
    (dict(temperature=-1.0), ConfigError, "temperature must be >= 0"),
    (dict(top_p=0.0), ConfigError, r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), ConfigError, r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-2), ConfigError, "top_k must be >= 0"),
    (dict(eos_token_id=211), ConfigError, r"eos_token_id 211 is outside the vocabulary \[0, 211\)"),
    (dict(eos_token_id="x"), ConfigError, "eos_token_id must be an integer"),
    (dict(pad_token_id=999), ConfigError, "pad_token_id 999 is outside"),
    (dict(seed=-1), ConfigError, "seed must lie in"),
    (dict(no_repeat_ngram_size=-1), ConfigError, "no_repeat_ngram_size must be >= 0"),
    (
        dict(max_new_tokens=250),
        MeteoRAError,
        "max_new_tokens=250 after a prompt of 13 tokens exceeds max_position",
    ),
    (dict(input_ids=np.ones((1, 300), int)), MeteoRAError, "300 tokens exceeds max_position_embeddings=256"),
    (dict(input_ids=np.array([[5, 300]])), MeteoRAError, "input_ids contain 300, outside the vocabulary"),
    (dict(input_ids=np.array([1, 2])), MeteoRAError, r"input_ids must be a non-empty integer array \(batch"),
    (dict(attention_mask=np.array([[1, 0]] * 3)), MeteoRAError, "attention_mask has shape"),
    (
        dict(input_ids=np.ones((2, 3), int), attention_mask=[[1, 0, 1], [1, 1, 1]]),
        MeteoRAError,
        "pad on the left",
    ),
    (
        dict(input_ids=np.ones((2, 3), int), attention_mask=[[0, 0, 0], [1, 1, 1]]),
        MeteoRAError,
        "no real token",
    ),
    (dict(adapter_ids=[0, 1, 2]), MeteoRAError, "adapter_ids: this model has no adapters"),
    (dict(return_routing=True), MeteoRAError, "return_routing: this model has no adapters"),
    (dict(routing_temperature=2.0), MeteoRAError, "routing_temperature: this model has no adapters"),
]


@pytest.mark.parametrize(("kw", "error", "match"), BAD_SETTINGS, ids=lambda v: str(v)[:40])
def test_bad_settings_name_the_setting(base, kw, error, match):
    ids, mask = left_padded()
    kw = {"input_ids": ids, "attention_mask": None if "input_ids" in kw else mask, "max_new_tokens": 4, **kw}
    with pytest.raises(error, match=match):
        generate(base, **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(routing_top_k=4), r"routing_top_k must be an integer in \[1, 3\]"),
        (dict(routing_temperature=0.0), "routing_temperature must be a number > 0"),
        (dict(adapter_ids=[0, 3, 1]), r"adapter_ids must lie in \[-1, 3\)"),
        (dict(adapter_ids=[0, 1]), "adapter_ids must be 3 integers"),
    ],
)
def test_bad_routing_settings_name_the_setting(fused, kw, match):
    ids, mask = left_padded()
    with pytest.raises(MeteoRAError, match=match):
        generate(fused, ids, max_new_tokens=4, attention_mask=mask, **kw)


# ------------------------------------------------------------------------------ text and CLI


def test_text_in_text_out(setup, base, tmp_path):
    tokenizer = prompts.load_tokenizer(setup[1])
    texts = [prompts.format_prompt("add 2 and 3"), prompts.format_prompt("translate to german: good morning")]
    assert texts[0] == "[INST] add 2 and 3 [/INST]\n"
    batch = prompts.encode_prompts(tokenizer, texts)
    assert (
        batch.input_ids.shape[0] == 2 and batch.attention_mask[0, 0] == 0 and batch.attention_mask[1, 0] == 1
    )
    for row, text in enumerate(texts):
        real = batch.input_ids[row][batch.attention_mask[row].astype(bool)]
        assert real[0] == 1, "BOS first"
        pieces = prompts.token_texts(tokenizer, real)
        assert len(pieces) == len(real) and "".join(pieces) == "<s>" + text
    out = generate(
        base, batch.input_ids, max_new_tokens=20, attention_mask=batch.attention_mask, eos_token_id=2
    )
    decoder = prompts.IncrementalDecoder(tokenizer)
    streamed = "".join(decoder.push(t) for t in np.asarray(out.new_tokens)[0] if t != 2)
    assert streamed == tokenizer.decode(np.asarray(out.new_tokens)[0], skip_special_tokens=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.load_tokenizer(setup[1] + "-missing")
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        prompts.load_tokenizer(tmp_path)


QUESTIONS = ["add 2 and 3", "is the sky green?", "the cat", "good morning"]


def prompt_file(path, questions):
    path.write_text("".join(json.dumps({"prompt": q, "response": "x"}) + "\n" for q in questions))
    return questions


STREAMED = ["--prompt", "add the numbers 2 and 3", "--max-new-tokens", "20", "--top-k-adapters", "1"]


def test_generate_command_streams_and_writes_routing(setup, tmp_path, capsys):
    _, base_dir, dirs = setup
    html, png, js = tmp_path / "r.html", tmp_path / "r.png", tmp_path / "r.json"
    argv = ["--base", base_dir, *[a for n, d in dirs.items() for a in ("--adapter", f"{n}={d}")], *STREAMED]
    argv += ["--routing-html", str(html), "--routing-png", str(png), "--routing-json", str(js)]
    with pytest.warns(UserWarning, match="untrained"):
        assert generate_command.main(argv) == 0
    streamed = capsys.readouterr().out
    record = json.loads(js.read_text())["sequences"][0]
    assert record["adapters"] == list(ADAPTERS) and len(record["layers"]) == 2 * len(PROJECTIONS)
    generated = [t for t in record["tokens"] if t["generated"]]
    assert 1 <= len(generated) <= 20
    assert all(abs(sum(t["weights"]) - 1) < 1e-5 for t in record["tokens"])
    assert all(len(ids) == 1 for ids in record["layers"]["layers.1.q_proj"]["ids"])  # top-1
    assert streamed.rstrip("\n") == "".join(t["text"] for t in generated).replace("</s>", "")
    assert record["tokens"][0]["text"] == "<s>" and "".join(t["text"] for t in record["tokens"]).startswith(
        "<s>[INST] add the numbers 2 and 3 [/INST]\n"
    )
    page = html.read_text()
    assert page.count('class="tok"') == len(record["tokens"]) and "top-1" in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_command_batches_a_prompt_file(setup, base, tmp_path, capsys):
    """Several batches go through the jitted loop; answers equal `generate` on the same batch."""
    base_dir = setup[1]
    path = tmp_path / "prompts.jsonl"
    questions = prompt_file(path, QUESTIONS + QUESTIONS[:2])
    argv = ["--base", base_dir, "--prompts", str(path), "--batch-size", "3", "--max-new-tokens", str(NEW)]
    assert generate_command.main([*argv, "--out", str(tmp_path / "out.jsonl")]) == 0
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in results] == questions
    tokenizer = prompts.load_tokenizer(base_dir)
    batch = prompts.encode_prompts(tokenizer, [prompts.format_prompt(q) for q in questions[:3]])
    out = generate(base, batch.input_ids, NEW, batch.attention_mask, eos_token_id=2)
    for row, result in enumerate(results[:3]):
        new = np.asarray(out.new_tokens)[row][np.asarray(out.attention_mask)[row, out.prompt_length :] == 1]
        assert result["response"] == tokenizer.decode(new, skip_special_tokens=True)
    # The same prompt in another batch (other row, other padding) gives the same answer.
    assert [r["response"] for r in results[4:]] == [r["response"] for r in results[:2]]
    assert generate_command.main([*argv, "--routing-html", str(tmp_path / "x.html")]) == 2
    assert "need adapters" in capsys.readouterr().err
    assert generate_command.main(["--prompt", "hi"]) == 2
    assert "pass --ckpt CKPT, or --base DIR" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_is_named_by_its_line(setup, tmp_path, capsys):
    """A 64 KB prompt (a --prompts line or --prompt): one line naming where it came from, no
    traceback, nothing written."""
    path = tmp_path / "prompts.jsonl"
    prompt_file(path, [QUESTIONS[0], "a" * 65536])
    out = tmp_path / "out.jsonl"
    argv = ["--base", setup[1], "--max-new-tokens", "4"]
    assert generate_command.main([*argv, "--prompts", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path} line 2: the prompt has" in err and "max_position_embeddings" in err and "\n" not in err
    assert not out.exists()
    assert generate_command.main([*argv, "--prompt", "b" * 65536]) == 2
    assert "--prompt: the prompt has" in capsys.readouterr().err


def test_generate_command_reads_a_checkpoint(setup, tmp_path, capsys):
    """--ckpt finds the base in the checkpoint and generates as the adapters + same gates do."""
    from meteora_jax import cli

    _, base_dir, dirs = setup
    ckpt = tmp_path / "ckpt"
    adapters = [a for n, d in dirs.items() for a in ("--adapter", f"{n}={d}")]
    assert cli.main(["convert", "--base", base_dir, *adapters, "--out", str(ckpt)]) == 0
    capsys.readouterr()
    routing = ["--routing-json", str(tmp_path / "r.json")]
    assert generate_command.main(["--ckpt", str(ckpt), *STREAMED, *routing]) == 0
    from_checkpoint = capsys.readouterr().out
    with pytest.warns(UserWarning, match="untrained"):  # the same seed-0 gates as the checkpoint's
        assert generate_command.main(["--base", base_dir, *adapters, *STREAMED, *routing]) == 0
    assert from_checkpoint == capsys.readouterr().out and from_checkpoint.strip()
    assert generate_command.main(["--ckpt", str(ckpt), "--gates", str(ckpt), "--prompt", "x"]) == 2
    assert "pass one of them" in capsys.readouterr().err
