"""Text in, text out: the base model's tokenizer, the MeteoRA prompt format, the token rules.

The reference formats every task prompt as `"[INST] {input} [/INST]\\n"` (docs/method.md) and
its LLaMA tokenizer adds BOS; we do both by default, at generation as at training: generation
(`encode_prompts`) and training (`encode_example`, `encode_segments`) encode prompts through the
one function `encode_prompt`, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.inputs import check_text
from meteora_jax.io.jsonl import read_jsonl

PROMPT_TEMPLATE = "[INST] {input} [/INST]\n"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


def format_prompt(text: str) -> str:
    """`text` in the MeteoRA instruction format: "[INST] {text} [/INST]\\n"."""
    return PROMPT_TEMPLATE.format(input=text)


def unformat_prompt(text: str) -> str | None:
    """The input of a prompt already in the instruction format (as the MeteoRA reference stores
    its task files), or None for a raw prompt."""
    head, tail = PROMPT_TEMPLATE.split("{input}")
    if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
        return text[len(head) : len(text) - len(tail)]
    return None


def read_as_inputs(prompts: Sequence[str], source: str) -> list[str]:
    """`prompts` with those already in the instruction format (the MeteoRA reference stores its
    task prompts so) read as the text inside it, so that they are wrapped once, not twice; said
    once, naming `source` and how many, since a prompt exactly in the template cannot be told
    from one meant to be wrapped again."""
    inner = [unformat_prompt(p) for p in prompts]
    count = sum(i is not None for i in inner)
    if count:
        warnings.warn(
            f"{source}: {count} of {len(prompts)} prompts are already in the instruction format "
            f"({PROMPT_TEMPLATE!r}); they are read as the text inside it, which is wrapped once",
            UserWarning,
            stacklevel=3,
        )
    return [p if i is None else i for p, i in zip(prompts, inner, strict=True)]


def load_tokenizer(base_dir: str | os.PathLike):
    """The tokenizer saved in a HF model folder (transformers AutoTokenizer, local files only)."""
    import transformers  # noqa: PLC0415  (heavy; only text-facing callers need it)

    base_dir = os.fspath(base_dir)
    if not os.path.isdir(base_dir):
        raise MissingFileError(f"base model folder {base_dir} does not exist")
    if not any(os.path.isfile(os.path.join(base_dir, f)) for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{base_dir} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save one there, or point to its folder (--tokenizer)"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{base_dir} holds no usable tokenizer (tokenizer.json / tokenizer.model with "
            f"tokenizer_config.json): {e}"
        ) from None


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """input_ids / attention_mask (B, T) int32, padded on the left with `pad_token_id`."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pad_token_id: int


def pad_token_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked, so any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_prompt(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """The ids of an already formatted prompt `text`, with the tokenizer's own special tokens (BOS).

    The single place a prompt becomes tokens, for generation and for training alike; text the
    tokenizer cannot take (`check_text`) is refused here, not deep inside it.
    """
    check_text(text, "a prompt")
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _text_ids(tokenizer, text: str) -> list[int]:
    """Continuation text (a response, a segment) without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts BOS in front of an encoding, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = encode_prompt(tokenizer, "a")
    without = encode_prompt(tokenizer, "a", add_special_tokens=False)
    return [int(bos)] if with_special[:1] == [bos] and without[:1] != [bos] else []


def encode_example(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], int]:
    """A task sample as training sees it: (ids, number of prompt tokens).

    The prompt part is `format_prompt(prompt)` encoded exactly as generation encodes it
    (`encode_prompt`, BOS by the tokenizer's own rule). The response, when given, is tokenised on
    its own without special tokens and followed by EOS (if the tokenizer has one), so the model
    learns to stop. Note that a sentencepiece tokenizer may give the response's first word the
    word-start form it would not get right after the prompt's newline.
    """
    ids = encode_prompt(tokenizer, format_prompt(prompt))
    num_prompt = len(ids)
    if response is not None:
        ids += _text_ids(tokenizer, response) + _eos(tokenizer)
    return ids, num_prompt


def encode_segments(tokenizer, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """A sample whose text switches task: (ids, tokens per segment).

    Each text is tokenised without special tokens; BOS (if the tokenizer adds one) comes once at the
    start and counts to the first segment, EOS (if any) at the end and counts to the last.
    """
    if isinstance(texts, str) or not texts:
        raise ConfigError("texts must be a non-empty list of strings")
    pieces = [_text_ids(tokenizer, t) for t in texts]
    pieces[0] = bos_prefix(tokenizer) + pieces[0]
    pieces[-1] = pieces[-1] + _eos(tokenizer)
    return [i for p in pieces for i in p], [len(p) for p in pieces]


def encode_prompts(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> EncodedBatch:
    """Tokenises `texts` (BOS added when the tokenizer adds it) into one left-padded batch."""
    if isinstance(texts, str) or not texts:
        raise ConfigError("texts must be a non-empty list of strings")
    rows = [encode_prompt(tokenizer, t, add_special_tokens=add_special_tokens) for t in texts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ConfigError(f"prompt {empty[0]} encodes to no tokens")
    pad = pad_token_of(tokenizer)
    ids, mask = left_pad(rows, pad)
    return EncodedBatch(ids, mask, pad)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, width) int32 of token rows left-padded to `width` (default: the longest)."""
    width = max(len(r) for r in rows) if width is None else width
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is the decoded text.

    Decoding token by token loses the spaces and multi-byte characters that tokenizers only
    render in context, so each piece is the growth of the decoded text of the tokens since a
    recent offset; a piece ending in an incomplete character is held back until it completes.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, context: int = 6):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = context
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from here, so the text keeps its in-context form
        self.read_offset = 0  # tokens up to here are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly complete text (possibly "")."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if after.endswith(_REPLACEMENT) or not after.startswith(before):
            return ""
        self.prefix_offset = max(self.prefix_offset, len(self.ids) - self.context)
        self.read_offset = len(self.ids)
        return after[len(before) :]


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """One display piece per token (special tokens shown), concatenating to the decoded text."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=False)
    return [decoder.push(i) for i in ids]


def read_prompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """("FILE line N", the "prompt" field) of every line of a JSONL file (task files also carry
    "response")."""
    path = os.fspath(path)
    prompts = []
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ConfigError(f'{where}: expected an object with a string "prompt"')
        prompts.append((where, record["prompt"]))
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def check_prompt_lengths(
    tokenizer, prompts: Sequence[tuple[str, str]], max_positions: int, max_new_tokens: int
) -> None:
    """Refuses, before any generation, prompts ((where, formatted text) pairs) whose tokens and
    `max_new_tokens` do not fit the model's `max_positions` (max_position_embeddings).

    Raises:
        ConfigError: naming the first such prompt's file and line, its tokens, and how many are
            too long.
    """
    long = []
    for where, text in prompts:
        n = len(encode_prompt(tokenizer, text))
        if n + max_new_tokens > max_positions:
            long.append((where, n))
    if long:
        where, n = long[0]
        others = f" ({len(long)} prompts are too long)" if len(long) > 1 else ""
        raise ConfigError(
            f"{where}: the prompt has {n} tokens; with --max-new-tokens {max_new_tokens} it needs "
            f"{n + max_new_tokens} positions, more than the model's {max_positions} "
            f"(max_position_embeddings){others}: shorten or leave out such prompts"
        )


def round_trip_problems(tokenizer, texts: Iterable[str]) -> list[str]:
    """The texts the tokenizer cannot write, each with why: an unknown token in its encoding, or
    a decoding that differs from it (`decode(encode(text)) != text`)."""
    unk = tokenizer.unk_token_id
    problems = []
    for text in dict.fromkeys(texts):
        ids = _text_ids(tokenizer, text)
        back = tokenizer.decode(ids, skip_special_tokens=False)
        if unk is not None and unk in ids:
            missing = sorted({c for c in text if unk in _text_ids(tokenizer, c)})
            problems.append(f"{text!r} holds characters the tokenizer lacks: {''.join(missing)!r}")
        elif back != text:
            problems.append(f"{text!r} decodes as {back!r}")
    return problems


def check_round_trip(tokenizer, texts: Iterable[str], what: str) -> None:
    """Raises ConfigError naming the first texts of `what` that the tokenizer cannot write (see
    `round_trip_problems`): a model can never produce, nor learn from, such text."""
    problems = round_trip_problems(tokenizer, texts)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"{what}: {len(problems)} texts do not survive the tokenizer round trip: "
            + "; ".join(problems[:3])
            + more
        )


def train_tiny_tokenizer(
    texts: Sequence[str], out_dir: str | os.PathLike, vocab_size: int | None = 200, words: Sequence[str] = ()
):
    """A small LLaMA-style BPE tokenizer trained on `texts`, saved as a transformers folder.

    For tests and demos that must run without downloads: ids 0, 1, 2 are <unk>, <s>, </s>
    (LLaMA's), BOS is added to every encoding, and spaces are kept as "▁" (sentencepiece style)
    so decoding gives the text back. `vocab_size` None: one token per character of `texts` and
    no merges, so every text's characters are tokens whatever their neighbours (string tasks
    need that). `words`: strings that are one token each wherever they occur (template pieces,
    keywords). Returns the loaded `PreTrainedTokenizerFast`.
    """
    import tokenizers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    if vocab_size is None:
        vocab_size = 3 + len({c for t in texts for c in t.replace(" ", "▁")})
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = tokenizers.decoders.Replace("▁", " ")
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(list(words))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)
