"""Fine-tuning accuracy scorers (the paper's rules) and the task registry."""

from __future__ import annotations

import pytest

from nlsr.data import DATASETS, TASKS, accuracy, extract_gsm8k_answer, get_task, is_correct, load_records
from nlsr.data.tasks import canonical_number
from nlsr.errors import NlsrError


@pytest.mark.parametrize(("text", "expected"), [
    ("The final answer is:  18", "18"),                       # the authors' gold format
    ("The final answer is: 18.", "18"),                       # trailing period
    ("The final answer is: $1,000", "1000"),                  # dollar sign and thousands comma
    ("The final answer is: 1,234,567.00", "1234567"),
    ("The final answer is: 18.0", "18"),
    ("The final answer is: 18.50 dollars", "18.5"),
    ("The final answer is: -7", "-7"),                        # negative
    ("It drops to −5 degrees", "-5"),                         # unicode minus
    ("x = -3", "-3"),
    ("16-3-4 = 9", "9"),                                      # '-' after a digit is no sign
    ("16 - 3 - 4", "4"),
    ("He has 5 apples and buys 3 more, so 8 apples.", "8"),   # no marker: the last number
    ("<<16-3-4=9>>9 eggs a day.\nThe final answer is:  9\n\nBelow is 12", "9"),  # first marker wins
    ("The final answer is: 3, and 4", "3"),
    ("the final answer is: 12 (not 13)", "12"),               # case-insensitive
    ("the final answer is 15 * 8 = 120.\nThe final answer is:  120", "120"),  # the colon is required
    ("The final answer is: unknown. Earlier we found 42", "42"),  # nothing after the marker: last number
    ("Earlier 42. The final answer is: unknown", "42"),
    ("The answer is .5", "0.5"),
    ("no digits here", None),
    ("", None),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("1,080", "1080"), ("18.0", "18"), ("-0", "0"), ("$5", "5"),
                                                ("0.250", "0.25"), ("abc", None), ("", None)])
def test_canonical_number(text, expected):
    assert canonical_number(text) == expected


@pytest.mark.parametrize(("output", "label", "expected"), [
    ("The final answer is: 18.0", "18", True),
    ("The final answer is: $1,000.", "1,000", True),
    ("The final answer is: -5", "-5", True),
    ("The final answer is: 5", "-5", False),
    ("so the total is 72", "72", True),
    ("The final answer is: 71", "72", False),
    ("I cannot answer", "72", False),
])
def test_gsm8k_scoring(output, label, expected):
    assert is_correct("gsm8k", output, label) is expected


@pytest.mark.parametrize(("output", "label", "expected"), [
    ("positive", "positive", True),
    (" Positive.", "positive", True),
    ("NEGATIVE", "negative", True),
    ("negative", "positive", False),
    ("", "positive", False),
])
def test_sst2_scoring(output, label, expected):
    assert is_correct("sst2", output, label) is expected


@pytest.mark.parametrize(("output", "label", "expected"), [
    ("Sci/Tech", "Sci/Tech", True),
    ("The category is sports.", "Sports", True),
    ("World", "Business", False),
    ("Science", "Sci/Tech", False),
])
def test_ag_news_scoring(output, label, expected):
    assert is_correct("ag_news", output, label) is expected


def test_several_classes_count_as_correct_under_the_paper_rule_but_not_strict():
    assert is_correct("ag_news", "World or Business", "Business")
    assert not is_correct("ag_news", "World or Business", "Business", strict=True)
    assert is_correct("ag_news", "Business", "Business", strict=True)
    assert is_correct("sst2", "positive and negative", "negative")
    assert not is_correct("sst2", "positive and negative", "negative", strict=True)


def test_bad_labels_are_errors():
    with pytest.raises(NlsrError, match="sst2 label 'neutral'"):
        is_correct("sst2", "neutral", "neutral")
    with pytest.raises(NlsrError, match="ag_news label 'Tech'"):
        is_correct("ag_news", "Tech", "Tech")
    with pytest.raises(NlsrError, match="gsm8k label 'many' is not a number"):
        is_correct("gsm8k", "3", "many")


def test_accuracy():
    assert accuracy("sst2", ["positive", "negative", "positive", "meh"],
                    ["positive", "positive", "positive", "negative"]) == 0.5
    with pytest.raises(NlsrError, match="got 2 outputs and 1 labels"):
        accuracy("sst2", ["a", "b"], ["positive"])
    with pytest.raises(NlsrError, match="no outputs"):
        accuracy("sst2", [], [])


def test_unknown_task_suggests():
    with pytest.raises(NlsrError, match="unknown task 'sst'; did you mean 'sst2'\\? \\(known: ag_news, gsm8k, sst2\\)"):
        accuracy("sst", ["x"], ["positive"])


def test_task_registry_points_at_registered_datasets():
    assert set(TASKS) == {"sst2", "ag_news", "gsm8k"}
    for spec in map(get_task, TASKS):
        assert spec.train_dataset in DATASETS and spec.eval_dataset in DATASETS
        assert DATASETS.get(spec.eval_dataset).kind == "task"
    assert get_task("gsm8k").max_new_tokens >= 256 > get_task("sst2").max_new_tokens
    assert get_task("ag_news").max_new_tokens <= 16


@pytest.mark.parametrize("task", sorted(TASKS))
def test_gold_outputs_score_100_percent(root, task):
    records = load_records(get_task(task).eval_dataset, data_dir=root)
    assert accuracy(task, [r["output"] for r in records], [r["label"] for r in records]) == 1.0
    assert accuracy(task, [r["output"] for r in records], [r["label"] for r in records], strict=True) == 1.0


def test_gsm8k_train_golds_are_recovered_from_the_outputs(root):
    records = load_records("gsm8k_train", data_dir=root)
    assert all(extract_gsm8k_answer(r["output"]) == r["label"] for r in records)
