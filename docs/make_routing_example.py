"""Makes docs/routing_example.png and docs/routing_heatmap.png from a real run of `generate`.

Everything is built on the fly, nothing is downloaded: a small BPE tokenizer trained on a few
sentences, a tiny random LLaMA saved in HF format, and three random PEFT LoRA adapters
("math", "translate", "chat") with different target modules. The gates are untrained
(random), so the picture shows the mechanics of the view, not learned routing.

    .venv/bin/python docs/make_routing_example.py [--chromium /usr/bin/chromium] [--keep DIR]

It runs the `generate` command (printing the exact command line), which streams the answer
and writes the HTML routing view, the heatmap and the JSON trace; then headless Chromium
takes the screenshot of the HTML page.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from flax import nnx

import meteora_jax as mj
from meteora_jax.config import projection_shape
from meteora_jax.data.prompts import train_tiny_tokenizer
from meteora_jax.io.peft import LoRAAdapter, LoRAModule
from meteora_jax.io.peft_write import write_adapter

DOCS = os.path.dirname(os.path.abspath(__file__))
CORPUS = [
    "[INST] What is 12 plus 30? [/INST]\n 12 plus 30 is 42.",
    "[INST] Translate to German: the weather is nice today. [/INST]\n Das Wetter ist heute schön.",
    "[INST] Translate to Spanish: good morning, my friend. [/INST]\n Buenos días, mi amigo.",
    "[INST] How are you today? [/INST]\n I am fine, thank you. How can I help you?",
    "[INST] Count the objects: an apple, two pears and a banana. [/INST]\n There are four objects.",
    "[INST] Solve: 7 times 6 minus 2. [/INST]\n 7 times 6 is 42, minus 2 is 40.",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.",
]
ADAPTERS = {
    "math": ("q_proj", "v_proj", "up_proj", "down_proj"),
    "translate": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "chat": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
PROMPT = "Translate to German: good morning, my friend. Then add 12 and 30."


def build_model(root: str, seed: int = 0) -> tuple[str, dict[str, str]]:
    """A tiny random LLaMA with a tokenizer in `root`/base, and three PEFT adapters beside it."""
    base_dir = os.path.join(root, "base")
    tokenizer = train_tiny_tokenizer(CORPUS * 8, os.path.join(root, "tokenizer"), vocab_size=320)
    config = mj.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=(tokenizer.eos_token_id,),
    )
    model = mj.LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    for _, variable in nnx.iter_graph(model):  # LLaMA's 0.02 init gives near-uniform logits
        if isinstance(variable, nnx.Param) and variable[...].ndim >= 2:
            variable[...] = variable[...] * 6
    mj.save_llama(model, base_dir)
    tokenizer.save_pretrained(base_dir)
    rng = np.random.default_rng(seed + 1)
    dirs = {}
    for name, targets in ADAPTERS.items():
        modules = {}
        for layer in range(config.num_hidden_layers):
            for proj in targets:
                d_in, d_out = projection_shape(config, proj)
                a = rng.normal(0, 1 / np.sqrt(d_in), (4, d_in))
                b = rng.normal(0, 0.5, (d_out, 4))
                modules[(layer, proj)] = LoRAModule.from_alpha(a, b, alpha=8.0)
        dirs[name] = os.path.join(root, name)
        write_adapter(LoRAAdapter(name, modules), dirs[name], config=config)
    return base_dir, dirs


def screenshot(chromium: str, page: str, png: str, profile: str) -> None:
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1000,520",
            f"file://{os.path.abspath(page)}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--keep", help="build the model here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="meteora-routing-example-")
    base_dir, dirs = build_model(root)
    html = os.path.join(DOCS, "routing_example.html")
    command = [sys.executable, "-m", "meteora_jax.commands.generate", "--base", base_dir]
    for name, folder in dirs.items():
        command += ["--adapter", f"{name}={folder}"]
    command += ["--prompt", PROMPT, "--max-new-tokens", "40", "--temperature", "0.7", "--top-p", "0.9"]
    command += ["--seed", "3", "--routing-temperature", "0.5", "--routing-html", html]
    command += ["--routing-png", os.path.join(DOCS, "routing_heatmap.png")]
    command += ["--routing-json", os.path.join(root, "routing.json")]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    screenshot(args.chromium, html, os.path.join(DOCS, "routing_example.png"), os.path.join(root, "chromium"))
    print(f"wrote {DOCS}/routing_example.png, routing_heatmap.png and routing_example.html (model in {root})")


if __name__ == "__main__":
    main()
