"""Answer metrics, answer cleaners and the composite-answer parser; plain Python over strings.

Scales: accuracies and ROUGE F1 are fractions in [0, 1]; BLEU is sacrebleu's 0-100. Every metric
scores a whole list of (prediction, reference) pairs: an empty prediction is scored as an empty
answer (never dropped, unlike the reference implementation), and an empty list is an error, since
a score of nothing means nothing.

The reference implementation lower-cased its predictions but not its references before BLEU, and
scored BLEU one hypothesis at a time; here BLEU is one corpus score, case-sensitive, over all pairs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from decimal import Decimal

import sacrebleu

ACCURACY_MODES = ("exact", "contains", "exact_cased")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Porter stemming is English-only and off by default in rouge-score (the reference's ROUGE package
# did not stem either), so "cats" and "cat" are different words here.
ROUGE_STEMMER = False

# A number as written in a maths answer: an optional sign (not the minus of "5-3"), digits with
# optional thousands commas ("1,234" but not the list "1,2,3"), an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# The gsm8k reference's final-answer line, then the model's (matched in the text itself, not a
# lower-cased copy, whose offsets can differ).
_GSM8K_MARKERS = (re.compile("####"), re.compile("the answer is", re.IGNORECASE))
_COMPOSITE_LINE = re.compile(r"\s*(\d+)\.(?:[ \t]+(.*)|[ \t]*)")
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits at


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up")
    if not preds:
        raise ValueError("no (prediction, reference) pairs to score")


def accuracy(preds: Sequence[str], refs: Sequence[str], mode: str = "contains") -> float:
    """Fraction in [0, 1] of pairs whose lower-cased, stripped reference equals (`mode="exact"`) or
    is contained in (`mode="contains"`) the lower-cased, stripped prediction; `"exact_cased"`:
    equals it with case kept (for tasks where case is the answer).

    An empty reference is right only for an empty prediction in both modes: containment would
    otherwise give every answer a free point. Raises ValueError for unequal lengths, no pairs or
    an unknown mode.
    """
    if mode not in ACCURACY_MODES:
        raise ValueError(f"accuracy mode {mode!r} is not one of {', '.join(ACCURACY_MODES)}")
    _check_pairs(preds, refs)
    right = 0
    for pred, ref in zip(preds, refs, strict=True):
        pred, ref = (
            (pred.strip(), ref.strip())
            if mode == "exact_cased"
            else (pred.strip().lower(), ref.strip().lower())
        )
        right += (ref in pred) if mode == "contains" and ref else (pred == ref)
    return right / len(preds)


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100, default 13a tokenizer, case-sensitive) of the predictions
    against one reference each; not a mean of sentence BLEUs."""
    _check_pairs(preds, refs)
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # noqa: PLC0415 (pulls in nltk: ~0.6 s, only when scored)

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=ROUGE_STEMMER)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"}: rouge-score's F1 of each pair, averaged over the pairs, in
    [0, 1]. rouge-score gives 0 when either side has no (ASCII alphanumeric) token."""
    _check_pairs(preds, refs)
    scorer = _rouge_scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
    return {kind: total / len(preds) for kind, total in totals.items()}


def composite_lines(text: str, n: int) -> list[tuple[int, str] | None]:
    """(character offset in `text` where "{i}." begins, the answer) of answers 1..n of a
    composite reply, in number order; None where no line holds the answer. The rule is
    `parse_composite`'s, which this is (it drops the offsets)."""
    if n < 0:
        raise ValueError(f"a composite reply has a non-negative number of answers, not {n}")
    found: dict[str, tuple[int, str]] = {}  # keyed by the digits as written, so "01." is not answer 1
    offset = 0
    for line in text.splitlines(keepends=True):
        # keepends, so offsets count the line breaks; a line holds at most one break ("\r\n" is one)
        match = _COMPOSITE_LINE.fullmatch(line.rstrip(_LINE_BREAKS))
        if match:
            found.setdefault(match.group(1), (offset + match.start(1), (match.group(2) or "").strip()))
        offset += len(line)
    return [found.get(str(i)) for i in range(1, n + 1)]


def parse_composite(text: str, n: int) -> list[str | None]:
    """The answers 1..n of a composite reply, in number order: answer i is the rest (stripped) of
    the first line that starts, after optional whitespace, with "{i}." and then whitespace or the
    line's end; None where no line does.

    "10. x" is answer 10, never 1; "1.5 apples" and "01. x" are no answer; a bare "1." is the empty
    answer "" (present but empty, unlike None; both score as the empty answer).
    Lines may come in any order, a repeated number keeps its first line, other text is ignored.
    """
    return [None if line is None else line[1] for line in composite_lines(text, n)]


def clean_strip(text: str) -> str:
    """The answer without surrounding whitespace."""
    return text.strip()


def _canonical_number(raw: str) -> str:
    """ "1,234" -> "1234", "42.0" -> "42", "3.50" -> "3.5", "007" -> "7"."""
    return format(Decimal(raw.replace(",", "")).normalize(), "f")


def clean_gsm8k(text: str) -> str:
    """The final number of a maths answer, canonical: the first number after the first "####"
    (the gsm8k reference's answer line) or else after "The answer is" (any case); without either,
    or with no number after it, the last number in the text; "" when the text has no number."""
    for marker in _GSM8K_MARKERS:
        found = marker.search(text)
        if found:
            after = _NUMBER.search(text, found.end())
            if after:
                return _canonical_number(after.group())
            break
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else ""


def clean_first_word(text: str) -> str:
    """The first word, lower-cased, without punctuation ("Yes, because..." -> "yes"); tokens that are
    all punctuation ("- yes") are skipped; "" for an answer with no word."""
    for token in text.lower().split():
        word = re.sub(r"[^\w]", "", token)
        if word:
            return word
    return ""


CLEANERS: dict[str, Callable[[str], str]] = {
    "strip": clean_strip,
    "gsm8k": clean_gsm8k,
    "first_word": clean_first_word,
}
