"""Answer metrics against hand-worked values and sacrebleu / rouge-score called directly; the
composite parser, the cleaners, and the task registry with its JSON overrides and refusals."""

from __future__ import annotations

import json
import re

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.evaluation import metrics
from meteora_jax.evaluation.metrics import (
    accuracy,
    bleu,
    clean_first_word,
    clean_gsm8k,
    parse_composite,
    rouge,
)
from meteora_jax.evaluation.registry import DEFAULT_REGISTRY, TaskScoring, load_registry

# Three pairs of unequal lengths and overlaps, so corpus BLEU and the mean of sentence BLEUs differ.
PREDS = [
    "the quick brown fox jumps over the lazy dog near the old river bank today",
    "a cat sat on a mat",
    "hello there my good friend how are you",
]
REFS = [
    "the quick brown fox jumped over the lazy dog near the old river bank today",
    "the cat sat on the mat",
    "hello my dear friend how are you doing",
]


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "exact", "contains"),
    [
        ("Valid", "valid", 1.0, 1.0),  # case
        ("  valid \n", " valid", 1.0, 1.0),  # whitespace on both sides
        ("invalid", "valid", 0.0, 1.0),  # containment is plain substring containment
        ("The answer is (B).", "(b)", 0.0, 1.0),
        ("valid", "invalid", 0.0, 0.0),
        ("", "valid", 0.0, 0.0),  # an empty prediction is scored, and wrong
        ("", "", 1.0, 1.0),
        ("anything", "", 0.0, 0.0),  # an empty reference is no free point for "contains"
    ],
)
def test_accuracy_exact_and_contains(pred, ref, exact, contains):
    assert accuracy([pred], [ref], mode="exact") == exact
    assert accuracy([pred], [ref], mode="contains") == contains


def test_accuracy_is_a_fraction_over_every_pair():
    assert accuracy(["a", "b", "", "d"], ["a", "x", "c", "D"], mode="exact") == 0.5
    assert accuracy(["xa", "b"], ["a", "c"]) == 0.5  # "contains" is the default


def test_accuracy_refusals():
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        accuracy(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no .* pairs"):
        accuracy([], [])
    assert accuracy(["ABC", "abc", " Ab "], ["ABC", "ABC", "Ab"], mode="exact_cased") == 2 / 3
    with pytest.raises(ValueError, match="'fuzzy' is not one of exact, contains, exact_cased"):
        accuracy(["a"], ["a"], mode="fuzzy")


# --- BLEU -------------------------------------------------------------------------------------


def test_bleu_is_sacrebleus_corpus_bleu_not_a_mean_of_sentences():
    got = bleu(PREDS, REFS)
    assert got == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    sentence_mean = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS, strict=True)) / 3
    assert abs(got - sentence_mean) > 5.0  # 60.9 against 50.3
    assert 0.0 < got < 100.0


def test_bleu_scale_and_case():
    sentence = "the cat sat on the mat"
    assert bleu([sentence, sentence], [sentence, sentence]) == pytest.approx(100.0)
    assert bleu([sentence.upper()], [sentence]) == 0.0  # case-sensitive on both sides
    assert bleu([p.upper() for p in PREDS], REFS) < bleu(PREDS, REFS)


def test_bleu_scores_empty_predictions():
    """An empty prediction stays in the corpus (it only lowers the brevity penalty's length)."""
    preds = [*PREDS, ""]
    refs = [*REFS, "an answer that was never given"]
    assert bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score
    assert bleu(preds, refs) < bleu(PREDS, REFS)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        bleu(["a"], ["a", "b"])


# --- ROUGE ------------------------------------------------------------------------------------


def test_rouge_hand_worked():
    # 3 of 3 predicted unigrams in the 6 of the reference: P 1, R 1/2, F1 2/3; bigrams: P 2/2,
    # R 2/5, F1 4/7; the longest common subsequence is the 3 unigrams, as for ROUGE-1.
    got = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3})


def test_rouge_is_the_mean_of_rouge_scores_f1():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per_pair = [scorer.score(r, p) for p, r in zip(PREDS, REFS, strict=True)]
    got = rouge(PREDS, REFS)
    assert set(got) == {"rouge1", "rouge2", "rougeL"}
    for kind in got:
        assert got[kind] == pytest.approx(sum(s[kind].fmeasure for s in per_pair) / len(per_pair), abs=1e-12)
        assert 0.0 < got[kind] < 1.0


def test_rouge_counts_empty_predictions_as_zero():
    full = rouge(PREDS, REFS)
    with_empty = rouge([*PREDS, ""], [*REFS, "never answered"])
    for kind in full:
        assert with_empty[kind] == pytest.approx(full[kind] * 3 / 4)


# --- composite answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "want"),
    [
        ("1. a\n2. b\n3. c", 3, ["a", "b", "c"]),
        ("3. c\n1. a\n2. b", 3, ["a", "b", "c"]),  # out of order
        ("1. a\n3. c", 3, ["a", None, "c"]),  # a missing number
        ("1. first\n1. second\n2. b", 2, ["first", "b"]),  # a repeated number: the first wins
        ("Sure, here you go:\n\n1. a\nnoise\n2. b\nHope this helps!", 2, ["a", "b"]),  # extra text
        ("   1. a  \n\t2. b", 2, ["a", "b"]),  # leading (and trailing) whitespace
        ("10. ten\n11. eleven\n1. one", 11, ["one", *[None] * 8, "ten", "eleven"]),
        ("10. ten\n11. eleven", 1, [None]),  # "10." and "11." are never answer 1
        ("2. see 1. above\n1. a", 2, ["a", "see 1. above"]),  # "1." inside another line's text
        ("the steps are 1. mix 2. bake", 2, [None, None]),  # numbers mid-line start no answer
        ("1.5 apples\n1.", 1, [""]),  # "1.5" is no answer; a bare "1." is the empty one
        ("1. \n2.\tb", 2, ["", "b"]),
        ("01. a", 1, [None]),
        ("1. a\r\n2. b\r\n", 2, ["a", "b"]),
        ("", 2, [None, None]),
        ("1. a", 0, []),
    ],
)
def test_parse_composite(text, n, want):
    assert parse_composite(text, n) == want


def test_parse_composite_refuses_a_negative_count():
    with pytest.raises(ValueError, match="-1"):
        parse_composite("1. a", -1)


# --- cleaners ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "72"),  # a gsm8k reference
        ("#### 1,234", "1234"),
        ("3 + 4 = 7. The answer is 42.", "42"),  # the trigger wins over a later or earlier number
        ("The answer is 5 apples, not 6.", "5"),
        ("the answer is: $1,234.50", "1234.5"),
        ("So she has 3 and then 7 left", "7"),  # no trigger: the last number
        ("It costs 42.0 dollars", "42"),
        ("The answer is 18.", "18"),
        ("The answer is -3", "-3"),
        ("5-3 = 2", "2"),
        ("the list 1,2,3", "3"),  # commas between small numbers are not thousands separators
        ("The answer is unknown, but 12 is close", "12"),  # no number after the trigger
        ("no number at all", ""),
        ("", ""),
    ],
)
def test_clean_gsm8k(text, want):
    assert clean_gsm8k(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Yes, because the sky is blue.", "yes"),
        ("  NO.", "no"),
        ("- yes", "yes"),
        ("**No**: it is not", "no"),
        ("", ""),
        ("...", ""),
    ],
)
def test_clean_first_word(text, want):
    assert clean_first_word(text) == want


def test_cleaners_by_name():
    assert set(metrics.CLEANERS) >= {"strip", "gsm8k", "first_word"}
    assert metrics.CLEANERS["strip"]("  a b \n") == "a b"


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "want"),
    [
        ("winowhy", ("exact",)),
        ("formal_fallacies_syllogisms_negation", ("exact",)),
        ("logical_deduction", ("contains",)),
        ("reasoning_about_colored_objects", ("contains",)),
        ("cnn_dailymail", ("bleu", "rouge")),
        ("news_commentary_de", ("bleu",)),
        ("strategyqa", ("bleu", "rouge", "yes_no")),
        ("gsm8k", ("number",)),
    ],
)
def test_default_table(task, want):
    assert DEFAULT_REGISTRY.scoring(task).metrics == want
    assert DEFAULT_REGISTRY.scoring(task).cleaner == "strip"


def test_the_default_table_names_the_28_reference_tasks():
    assert len(DEFAULT_REGISTRY.tasks) == 28


def test_an_unknown_task_falls_back_to_exact_match():
    assert DEFAULT_REGISTRY.scoring("my_new_task") == TaskScoring(("exact",))
    assert DEFAULT_REGISTRY.score("my_new_task", ["Paris ", "paris is it"], ["paris", "paris"]) == {
        "exact_match": 0.5
    }


def test_score_result_keys():
    keys = {
        task: set(DEFAULT_REGISTRY.score(task, ["a b c d"], ["a b c d"])) for task in DEFAULT_REGISTRY.tasks
    }
    assert keys["winowhy"] == {"exact_match"}
    assert keys["object_counting"] == {"accuracy"}
    assert keys["alpaca"] == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert keys["news_commentary_it"] == {"bleu"}
    assert keys["strategyqa"] == {"bleu", "rouge1", "rouge2", "rougeL", "yes_no_accuracy"}
    assert keys["gsm8k"] == {"accuracy"}


def test_strategyqa_scores_bleu_on_the_text_and_yes_no_on_the_first_word():
    preds = ["Yes. Paris is the capital of France.", "no, it is not", None]
    refs = ["yes, Paris is the capital of France.", "Yes. It is.", "No."]
    got = DEFAULT_REGISTRY.score("strategyqa", preds, refs)
    assert got["yes_no_accuracy"] == pytest.approx(1 / 3)  # the None is scored, as the empty answer
    texts = [p or "" for p in preds]
    assert got["bleu"] == sacrebleu.corpus_bleu(texts, [refs]).score
    assert got["rouge1"] == pytest.approx(rouge(texts, refs)["rouge1"])


def test_gsm8k_compares_the_final_numbers():
    preds = ["6 * 7 = 42. The answer is 42.0", "I think 1,234 apples", "The answer is 7", ""]
    refs = ["6 * 7 = 42\n#### 42", "#### 1,234", "#### 8", "#### 3"]
    assert DEFAULT_REGISTRY.score("gsm8k", preds, refs) == {"accuracy": 0.5}


def test_score_refusals_name_the_task():
    with pytest.raises(ValueError, match="task 'winowhy': 1 predictions but 2 references"):
        DEFAULT_REGISTRY.score("winowhy", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="task 'winowhy': no answers"):
        DEFAULT_REGISTRY.score("winowhy", [], [])


def test_task_scoring_validation_lists_the_known_names():
    with pytest.raises(
        ConfigError, match="unknown metric 'f1'; known metrics: exact, exact_cased, contains, bleu"
    ):
        TaskScoring(("exact", "f1"))
    with pytest.raises(
        ConfigError, match="unknown cleaner 'lower'; known cleaners: strip, gsm8k, first_word"
    ):
        TaskScoring(("exact",), cleaner="lower")
    with pytest.raises(ConfigError, match="accuracy twice"):
        TaskScoring(("contains", "number"))
    with pytest.raises(ConfigError, match="no metrics"):
        TaskScoring(())
    with pytest.raises(ConfigError, match="tuple of metric names"):
        TaskScoring(["exact"])


def _write(tmp_path, content) -> str:
    path = tmp_path / "metrics.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def test_load_registry_without_a_file_is_the_default():
    assert load_registry() is DEFAULT_REGISTRY


def test_a_json_file_overrides_adds_and_sets_the_default(tmp_path):
    path = _write(
        tmp_path,
        {
            "winowhy": {"metrics": ["contains", "bleu"]},
            "my_math": {"metrics": ["exact"], "cleaner": "gsm8k"},
            "*": {"metrics": ["contains"]},
        },
    )
    registry = load_registry(path)
    assert registry.scoring("winowhy") == TaskScoring(("contains", "bleu"), "strip")
    assert registry.score("my_math", ["so 4 in all"], ["#### 4.0"]) == {"exact_match": 1.0}
    assert registry.scoring("elsewhere") == TaskScoring(("contains",))
    assert registry.scoring("gsm8k") == DEFAULT_REGISTRY.scoring("gsm8k")  # the rest stays
    assert DEFAULT_REGISTRY.scoring("winowhy").metrics == ("exact",)  # the default table is untouched


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('["winowhy"]', "the top level must be an object of task -> entry, not an array"),
        ({"winowhy": ["exact"]}, "task 'winowhy': an entry is an object"),
        ({"winowhy": {"metrics": ["f1"]}}, "task 'winowhy': unknown metric 'f1'; known metrics: exact"),
        ({"winowhy": {"metrics": ["exact"], "cleaner": "lower"}}, "task 'winowhy': unknown cleaner 'lower'"),
        ({"winowhy": {"metrics": "exact"}}, "task 'winowhy': \"metrics\" must be an array of metric names"),
        ({"winowhy": {"metrics": ["exact", 3]}}, "task 'winowhy': \"metrics\" must be an array"),
        (
            {"winowhy": {"metrics": ["exact"], "cleaner": 1}},
            "task 'winowhy': \"cleaner\" must be a cleaner name",
        ),
        ({"winowhy": {"metric": ["exact"]}}, "task 'winowhy': unknown field metric; known fields: metrics"),
        ({"winowhy": {"cleaner": "strip"}}, "task 'winowhy': no \"metrics\""),
        ({"winowhy": {"metrics": []}}, "task 'winowhy': no metrics named"),
        (
            {"*": {"metrics": ["bleu", "bleu"]}},
            "the default entry '\\*': metrics .* give the result bleu twice",
        ),
    ],
)
def test_bad_metrics_files_name_the_file_and_the_task(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_registry(path)
    text = str(err.value)
    assert text.startswith((f"{path}: ", f"metrics file {path}")), text
    assert re.search(message, text), text


def test_a_missing_or_unreadable_metrics_file(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere.json does not exist"):
        load_registry(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="bad.json cannot be read"):
        load_registry(tmp_path / "bad.json")
