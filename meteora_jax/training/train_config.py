"""The settings of one gate-training (or adapter-training) run, validated once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from meteora_jax.config import TOP_K
from meteora_jax.errors import ConfigError
from meteora_jax.inputs import is_int, is_real
from meteora_jax.modeling.attention import DEFAULT_ATTENTION, IMPLEMENTATIONS
from meteora_jax.modeling.llama import DEFAULT_GATE_LOSS_GRAD, DEFAULT_REMAT, GATE_LOSS_GRADS, REMAT_POLICIES
from meteora_jax.modeling.meteora_linear import NO_ROUTING_NOISE
from meteora_jax.ops.moe_lora import BACKENDS
from meteora_jax.settings import check_choices, setting
from meteora_jax.sharding import DEFAULT_MESH

COMPUTE_DTYPES = ("float32", "bfloat16")
TRAIN_BACKEND = "xla"  # the MoE-LoRA backend training runs use unless told: the dense path
LORA_DEFAULTS = {"lr": 2e-4, "clip_norm": 1.0}  # where train-lora's defaults differ from train-gate's

# Settings that shape the saved optimizer state: a run cannot resume under other values. (The
# data layout is checked by the data iterator's own state; other settings may change on resume,
# and the log names each one that did.)
SHAPE_SETTINGS = ("train_gates", "train_adapters")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run executes, not what it learns: its device mesh, kernels and progress bar (a run
    may resume under other options)."""

    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MESH))
    backend: str = setting(TRAIN_BACKEND, "MoE-LoRA backend", choices=BACKENDS)
    attention: str = setting(
        DEFAULT_ATTENTION,
        "attention implementation (auto: cuDNN flash on GPU in bf16, splash on TPU, else XLA)",
        choices=IMPLEMENTATIONS,
    )
    progress: bool = True

    def __post_init__(self):
        if problems := check_choices(self):
            raise ConfigError("run options: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one training run does, beyond its data (`DataConfig`) and its model.

    Attributes:
        steps: optimizer steps of the run (a rerun with more steps extends a finished run).
        lr: peak learning rate of AdamW, reached after `warmup_steps` of linear warmup.
        warmup_steps: linear warmup from 0 to `lr`.
        decay_steps: horizon of the cosine decay to 0 (None: `steps`); fixing it lets a run be
            extended without changing the schedule of the steps already taken.
        weight_decay: AdamW decoupled weight decay.
        clip_norm: global gradient-norm clip (0: off).
        grad_accum: micro-batches per step, summed inside the one jitted step.
        gate_loss_weight: lambda of loss = LM CE + lambda * gate CE (the reference: 50); at 0 the
            gate term is not computed at all (and its metrics are not logged).
        gate_loss_grad: what the gate term's gradient reaches. "gates": each gate only (its
            input hidden state is held constant), so the classification term cannot reshape the
            adapters or earlier layers to make tokens easier to classify, and the LM loss alone
            trains the adapters; "all": everything upstream too, as in the reference (with the
            adapters training, the classification term then reshapes them as well).
        routing_noise: scale of Gumbel noise added to the gate logits when training chooses each
            token's top-k (the weights stay those of the clean logits); at 1 the choice is a draw
            from the router's softmax, so the stacks also train under the picks it would get
            wrong. 0: the top-k of the logits, as the reference trains.
        train_gates: train the gates (False: `train-lora`, where the one adapter alone trains).
        train_adapters: train the LoRA stacks (with the gates, or alone).
        remat: what each decoder layer keeps for the backward pass ("none" | "dots" | "full").
        loss_chunk: slots of each row whose logits the LM loss holds at a time (recomputed in the
            backward pass), so the (B, S, V) float32 logits never exist whole; 0: all at once.
        dtype: compute dtype; trainable parameters and the loss stay float32.
        top_k: adapters chosen per token during training.
        seed: the dropout stream (the data order has its own seed in `DataConfig`).
        save_every / keep: checkpoint period and how many recent steps to keep.
        eval_every: held-out routing evaluation period (0: only at the end).
        log_every: metrics period (every step is still checked for a finite loss).
        new_data: resume a run whose data or data settings changed since its last step: the
            weights and optimizer go on, the data stream starts afresh (without it such a
            resume is refused, naming what changed).
    """

    steps: int = setting(1000, "optimizer steps")
    lr: float = setting(5e-4, "peak AdamW learning rate")
    warmup_steps: int = setting(0, "linear warmup steps")
    decay_steps: int | None = setting(None, "cosine horizon (default --steps)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    clip_norm: float = setting(0.3, "global grad-norm clip (0: off)")
    grad_accum: int = setting(1, "micro-batches per step")
    gate_loss_weight: float = setting(50.0, "W of loss = LM CE + W * gate CE (0: no gate term)")
    gate_loss_grad: str = setting(
        DEFAULT_GATE_LOSS_GRAD,
        "what the gate term trains: the gates only, or everything upstream too (the reference)",
        choices=GATE_LOSS_GRADS,
    )
    routing_noise: float = setting(
        NO_ROUTING_NOISE, "Gumbel noise scale on the gate logits when training picks the top-k (0: off)"
    )
    train_gates: bool = True
    train_adapters: bool = setting(False, "train the LoRA stacks as well")
    remat: str = setting(DEFAULT_REMAT, "decoder-layer remat", choices=tuple(REMAT_POLICIES))
    loss_chunk: int = setting(
        512, "slots per row the LM loss takes logits of at once (0: all)", metavar="SLOTS"
    )
    dtype: str = setting("float32", "compute dtype", choices=COMPUTE_DTYPES)
    top_k: int = setting(TOP_K, "adapters per token")
    seed: int = setting(0, "the dropout stream and the data order")
    save_every: int = setting(100, "checkpoint every N steps")
    keep: int = setting(3, "checkpoints kept")
    eval_every: int = setting(0, "held-out evaluation every N steps (0: at the end)")
    log_every: int = setting(1, "metrics every N steps")
    new_data: bool = setting(
        False, "resume a run whose data or data settings changed: weights and optimizer go on, the data "
        "stream starts afresh",
    )  # fmt: skip

    def __post_init__(self):
        problems = []
        for name, low in (
            ("steps", 1),
            ("grad_accum", 1),
            ("save_every", 1),
            ("keep", 1),
            ("log_every", 1),
            ("warmup_steps", 0),
            ("eval_every", 0),
            ("loss_chunk", 0),
            ("top_k", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        if self.decay_steps is not None and (not is_int(self.decay_steps) or self.decay_steps < 1):
            problems.append(f"decay_steps must be an integer >= 1 (or None), got {self.decay_steps!r}")
        for name in ("lr", "weight_decay", "clip_norm", "gate_loss_weight", "routing_noise"):
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value)) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if is_real(self.lr) and self.lr == 0:
            problems.append("lr must be > 0")
        for name in ("train_gates", "train_adapters", "new_data"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.train_gates is False and self.train_adapters is False:
            problems.append("nothing to train: train_gates and train_adapters are both False")
        problems += check_choices(self)
        if problems:
            raise ConfigError("training settings: " + "; ".join(problems))

    @property
    def horizon(self) -> int:
        """The step at which the cosine schedule reaches 0."""
        return self.steps if self.decay_steps is None else self.decay_steps

    def saves_at(self, step: int) -> bool:
        """Whether the run checkpoints after `step` (every `save_every` steps, and its last)."""
        return step % self.save_every == 0 or step == self.steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the run evaluates after `step` (every `eval_every` steps, and its last)."""
        return bool(self.eval_every) and step % self.eval_every == 0 or step == self.steps

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
