"""End-to-end float32 parity of the NNX LLaMA with transformers' LlamaForCausalLM.

Every checkpoint is a tiny random transformers model saved with `save_pretrained` and loaded
with `meteora_jax.load_model`; logits must agree to 1e-4 (logits are O(1): see
`DEFAULT_CONFIG` in conftest). Measured errors are printed in the terminal summary.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_model, max_abs, padded_positions, torch_logits

import meteora_jax as mj

TOL = 1e-4
VOCAB = 211


def _ids(rng_seed: int, batch: int, length: int, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(rng_seed).integers(0, vocab, (batch, length))


def _left_pad_mask(lengths: list[int], total: int) -> np.ndarray:
    return np.array([[0] * (total - n) + [1] * n for n in lengths], dtype=np.int32)


def _parity(record_error, label, torch_model, path, ids, mask=None, tol=TOL, **load_kwargs) -> np.ndarray:
    """Compares our logits with transformers' on `ids` (pad positions excluded); returns ours."""
    model = mj.load_model(path, **load_kwargs)
    position_ids = None if mask is None else padded_positions(mask)
    ref = torch_logits(torch_model, ids, mask, position_ids)
    got = np.asarray(model(ids, attention_mask=mask).logits)
    assert got.shape == ref.shape == (*ids.shape, torch_model.config.vocab_size)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    scale = float(np.max(np.abs(ref[keep])))
    err = record_error(f"{label}; max|logit| {scale:.2f}", max_abs(got[keep], ref[keep]))
    assert err <= tol, f"{label}: max abs error {err:.3e} > {tol:.0e}"
    return got


def _hf_dir(tmp_path_factory, name, **overrides):
    return make_hf_model(tmp_path_factory.mktemp(name), **overrides)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "gqa", num_hidden_layers=3)


def test_mha(tmp_path, record_error):
    torch_model, path = make_hf_model(tmp_path, num_key_value_heads=8)
    _parity(record_error, "mha", torch_model, path, _ids(0, 2, 37))


def test_gqa(gqa, record_error):
    _parity(record_error, "gqa", *gqa, _ids(1, 2, 41))


def test_llama3_rope_long_prompt(tmp_path, record_error):
    # ~500 tokens, far past original_max_position_embeddings=64: all three llama3 frequency
    # bands (kept, smoothed, divided by factor) are exercised; short prompts hide RoPE bugs.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    torch_model, path = make_hf_model(
        tmp_path, head_dim=16, hidden_size=128, max_position_embeddings=1024, rope_parameters=rope
    )
    assert mj.LlamaConfig.from_hf(path).rope_scaling.rope_type == "llama3"
    _parity(record_error, "llama3 rope, 500 tokens", torch_model, path, _ids(2, 1, 500))


def test_linear_rope(tmp_path, record_error):
    rope = {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    torch_model, path = make_hf_model(tmp_path, rope_parameters=rope)
    _parity(record_error, "linear rope", torch_model, path, _ids(3, 2, 45))


@pytest.mark.parametrize("length", [20, 70])
def test_dynamic_rope(tmp_path, record_error, length):
    # transformers rescales dynamic NTK rope from the longest sequence it has seen, so every
    # length is a single forward pass of a fresh model. max_position_embeddings=32: 20 tokens
    # use the plain rope, 70 tokens the rescaled base.
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    torch_model, path = make_hf_model(tmp_path, max_position_embeddings=32, rope_parameters=rope)
    _parity(record_error, f"dynamic rope, {length} tokens", torch_model, path, _ids(4, 2, length))


def test_tied_embeddings(tmp_path, record_error):
    torch_model, path = make_hf_model(tmp_path, tie_word_embeddings=True)
    assert mj.load_model(path).module.lm_head is None
    _parity(record_error, "tied embeddings", torch_model, path, _ids(5, 2, 33))


def test_explicit_head_dim(tmp_path, record_error):
    # N * H = 8 * 16 = 128 != hidden_size 64: q/o projections are not square.
    torch_model, path = make_hf_model(tmp_path, head_dim=16)
    assert mj.LlamaConfig.from_hf(path).head_dim == 16
    _parity(record_error, "head_dim 16 != 64/8", torch_model, path, _ids(6, 2, 29))


def test_left_padded_batch(gqa, record_error):
    torch_model, path = gqa
    lengths, total = [26, 19, 7], 26
    mask = _left_pad_mask(lengths, total)
    ids = _ids(7, 3, total)
    got = _parity(record_error, "left-padded batch", torch_model, path, ids, mask)
    model = mj.load_model(path)
    for row, n in enumerate(lengths):
        alone = np.asarray(model(ids[row : row + 1, total - n :]).logits)[0]
        err = record_error(f"padded row {row} vs alone", max_abs(got[row, total - n :], alone))
        assert err <= 1e-5, f"row {row}: padded and unpadded logits differ by {err:.3e}"
        ref_alone = torch_logits(torch_model, ids[row : row + 1, total - n :])[0]
        assert max_abs(alone, ref_alone) <= TOL


def test_sharded_checkpoint(tmp_path, record_error):
    torch_model, path = make_hf_model(tmp_path, max_shard_size="40KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1 and not os.path.exists(os.path.join(path, "model.safetensors"))
    _parity(record_error, f"sharded checkpoint ({len(shards)} files)", torch_model, path, _ids(8, 2, 31))


def test_bfloat16_checkpoint_file(tmp_path, record_error):
    # Published LLaMA weights are bfloat16 on disk; our own reader decodes them (safetensors'
    # numpy reader cannot), so a float32 model must match transformers on the same bf16 weights.
    torch_model, _ = make_hf_model(tmp_path / "f32")
    path = str(tmp_path / "bf16")
    torch_model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    # Reloaded rather than cast back with .float(): the cast would keep the rope inv_freq
    # buffer rounded to bfloat16.
    torch_model = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert torch_model.model.embed_tokens.weight.dtype == torch.float32
    _parity(record_error, "bf16 weights file, f32 compute", torch_model, path, _ids(9, 2, 23))


def test_scan_layers_matches_unrolled(gqa, record_error):
    _, path = gqa
    ids = _ids(10, 2, 27)
    mask = _left_pad_mask([27, 15], 27)
    scanned = np.asarray(mj.load_model(path, scan_layers=True)(ids, attention_mask=mask).logits)
    unrolled_model = mj.load_model(path, scan_layers=False)
    assert unrolled_model.module.scan_layers is False
    unrolled = np.asarray(unrolled_model(ids, attention_mask=mask).logits)
    err = record_error("scan vs unrolled", max_abs(scanned, unrolled))
    assert err <= 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decode_matches_full_forward(gqa, record_error, scan_layers):
    torch_model, path = gqa
    model = mj.load_model(path, scan_layers=scan_layers)
    prompt, steps = 17, 6
    ids = _ids(11, 2, prompt + steps)
    full = np.asarray(model(ids).logits)

    cache = model.init_cache(2, prompt + steps + 3)
    out = model(ids[:, :prompt], cache=cache)
    pieces = [np.asarray(out.logits)]
    for t in range(prompt, prompt + steps):
        out = model(ids[:, t : t + 1], cache=out.cache)
        pieces.append(np.asarray(out.logits))
    assert int(out.cache.index) == prompt + steps
    decoded = np.concatenate(pieces, axis=1)
    err = record_error(f"kv cache vs full forward (scan={scan_layers})", max_abs(decoded, full))
    assert err <= TOL
    assert max_abs(decoded, torch_logits(torch_model, ids)) <= TOL


def test_kv_cache_left_padded_batch(gqa, record_error):
    torch_model, path = gqa
    model = mj.load_model(path)
    prompt, steps, lengths = 15, 5, [15, 9, 4]
    mask = _left_pad_mask(lengths, prompt)
    ids = _ids(12, 3, prompt + steps)
    full_mask = np.concatenate([mask, np.ones((3, steps), np.int32)], axis=1)
    full = np.asarray(model(ids, attention_mask=full_mask).logits)

    cache = model.init_cache(3, prompt + steps)
    out = model(ids[:, :prompt], attention_mask=mask, cache=cache)
    pieces = [np.asarray(out.logits)]
    for t in range(prompt, prompt + steps):
        out = model(ids[:, t : t + 1], attention_mask=np.ones((3, 1), np.int32), cache=out.cache)
        pieces.append(np.asarray(out.logits))
    decoded = np.concatenate(pieces, axis=1)
    keep = full_mask.astype(bool)
    err = record_error("kv cache, left-padded", max_abs(decoded[keep], full[keep]))
    assert err <= TOL
    ref = torch_logits(torch_model, ids, full_mask, padded_positions(full_mask))
    assert max_abs(decoded[keep], ref[keep]) <= TOL
    # The decoded steps of each row equal that row decoded alone, without padding.
    for row, n in enumerate(lengths):
        alone = np.asarray(model(ids[row : row + 1, prompt - n :]).logits)[0]
        assert max_abs(decoded[row, prompt - n :], alone) <= TOL


def test_bfloat16_compute_close_to_float32(gqa, record_error):
    torch_model, path = gqa
    ids = _ids(13, 2, 40)
    f32 = np.asarray(mj.load_model(path)(ids).logits)
    model = mj.load_model(path, dtype="bfloat16")
    bf16 = model(ids).logits
    assert bf16.dtype == np.dtype("bfloat16")
    assert model.module.embed_tokens[...].dtype == np.dtype("bfloat16")
    assert model.init_cache(1, 4).k.dtype == np.dtype("bfloat16")
    bf16 = np.asarray(bf16, np.float32)
    torch_bf16 = torch_logits(copy.deepcopy(torch_model).to(torch.bfloat16), ids)
    scale = float(np.max(np.abs(f32)))
    ours = record_error("bf16 vs f32, max abs / max|logit|", max_abs(bf16, f32) / scale)
    theirs = record_error("transformers bf16 vs f32, max abs / max|logit|", max_abs(torch_bf16, f32) / scale)
    mean = record_error("bf16 vs f32, mean abs / max|logit|", float(np.mean(np.abs(bf16 - f32))) / scale)
    # Tolerance: bfloat16 rounds to 2**-8 relative, and through 3 layers with peaked attention
    # the worst logit drifts by a few percent of the logit scale (transformers' own bf16 run
    # drifts as much: measured ~4-5% max, ~0.4% mean for both). So we ask for: the mean error
    # under 1% of the scale, and the worst error at most 2x transformers' bf16 worst error.
    # A real bug (a cast in the wrong place, a bf16 softmax or norm) is far outside these.
    assert mean <= 0.01
    assert ours <= 2 * theirs
    agree = np.mean(bf16.argmax(-1) == f32.argmax(-1))
    assert agree >= 0.9, f"bf16 top-1 agrees with f32 on only {agree:.0%} of positions"


def _random_configs(count: int, seed: int = 20240917):
    """LLaMA configs drawn, not hand-picked; each with its own prompt length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        kv = int(rng.integers(1, 5))
        heads = kv * int(rng.integers(1, 5))
        head_dim = 2 * int(rng.integers(2, 17))  # even, 4..32
        hidden = heads * int(rng.integers(2, 9))  # transformers wants hidden % heads == 0
        rope_type = str(rng.choice(["default", "linear", "llama3"]))
        rope = {"rope_type": rope_type, "rope_theta": float(rng.choice([100.0, 10000.0, 500000.0]))}
        if rope_type == "linear":
            rope["factor"] = float(rng.uniform(1.5, 8.0))
        elif rope_type == "llama3":
            low = float(rng.uniform(0.5, 2.0))
            rope.update(
                factor=float(rng.uniform(2.0, 16.0)),
                low_freq_factor=low,
                high_freq_factor=low + float(rng.uniform(1.0, 4.0)),
                original_max_position_embeddings=int(rng.integers(8, 64)),
            )
        config = dict(
            vocab_size=int(rng.integers(50, 400)),
            hidden_size=hidden,
            intermediate_size=int(rng.integers(16, 200)),
            num_hidden_layers=int(rng.integers(1, 4)),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rope_parameters=rope,
            tie_word_embeddings=bool(rng.integers(0, 2)),
        )
        length = int(rng.integers(3, 90))
        out.append(
            pytest.param(
                config,
                length,
                int(rng.integers(1, 1000)),
                id=f"{rope_type}-y{config['num_hidden_layers']}n{heads}k{kv}h{head_dim}",
            )
        )
    return out


@pytest.mark.parametrize(("config", "length", "seed"), _random_configs(6))
def test_random_configs(tmp_path, record_error, config, length, seed):
    torch_model, path = make_hf_model(tmp_path, seed=seed, **config)
    ids = _ids(seed, 2, length, vocab=config["vocab_size"])
    _parity(record_error, f"random config, {length} tokens", torch_model, path, ids)


def test_save_llama_round_trip(gqa, tmp_path, record_error):
    torch_model, path = gqa
    model = mj.load_model(path)
    out_dir = str(tmp_path / "saved")
    mj.save_llama(model.module, out_dir, max_shard_bytes=30_000)
    names = sorted(os.listdir(out_dir))
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))

    ids = _ids(14, 2, 35)
    ours = np.asarray(model(ids).logits)
    reloaded_hf = transformers.LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert reloaded_hf.config.num_key_value_heads == 2
    hf_logits = torch_logits(reloaded_hf, ids)
    # Same float32 weights and config: transformers' output is unchanged by the round trip.
    assert max_abs(hf_logits, torch_logits(torch_model, ids)) <= 1e-6
    err = record_error("save_llama -> transformers", max_abs(hf_logits, ours))
    assert err <= TOL

    again = np.asarray(mj.load_model(out_dir)(ids).logits)
    np.testing.assert_array_equal(again, ours)


def test_save_llama_tied_llama3_single_file(tmp_path, record_error):
    # Our config.json uses the classic rope_scaling layout: transformers 5 must read it back.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 5000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 3.0,
        "original_max_position_embeddings": 16,
    }
    torch_model, path = make_hf_model(
        tmp_path / "src", tie_word_embeddings=True, num_hidden_layers=1, rope_parameters=rope
    )
    model = mj.load_model(path)
    out_dir = tmp_path / "saved"
    mj.save_llama(model.module, out_dir)
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
    assert mj.LlamaConfig.from_hf(out_dir) == model.config
    ids = _ids(15, 1, 60)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings and reloaded.config.rope_parameters["rope_type"] == "llama3"
    hf_logits = torch_logits(reloaded, ids)
    assert max_abs(hf_logits, torch_logits(torch_model, ids)) <= 1e-6
    err = record_error(
        "save_llama (tied, llama3) -> transformers", max_abs(hf_logits, np.asarray(model(ids).logits))
    )
    assert err <= TOL


def test_save_llama_refuses_existing_folder(gqa, tmp_path):
    _, path = gqa
    model = mj.load_model(path)
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=f"{out_dir}.*overwrite=True"):
        mj.save_llama(model.module, out_dir)
    assert (out_dir / "keep.txt").read_text() == "user data"
    mj.save_llama(model.module, out_dir, overwrite=True)
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
    ids = _ids(16, 1, 9)
    np.testing.assert_array_equal(
        np.asarray(mj.load_model(out_dir)(ids).logits), np.asarray(model(ids).logits)
    )
