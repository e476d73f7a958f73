"""Poisoned fine-tuning sets: proportions, determinism, nesting across p, validation, and the
authors' ready-made files."""

from __future__ import annotations

from collections import Counter

import pytest

from nlsr.data import available_ready_made, build_poisoned, load_ready_made, load_records
from nlsr.errors import NlsrError

TASK_ROWS = [{"instruction": "Classify", "input": f"sentence {i}", "output": "positive", "label": "positive"}
             for i in range(300)]
POISON_ROWS = [{"prompt": f"harmful {i}", "response": f"answer {i}"} for i in range(100)]


@pytest.mark.parametrize(("n", "p", "n_poison"), [(200, 0.0, 0), (200, 0.05, 10), (200, 0.2, 40),
                                                   (50, 1.0, 50), (7, 0.3, 2)])
def test_proportions_and_row_format(n, p, n_poison):
    rows = build_poisoned(TASK_ROWS, POISON_ROWS, n, p, seed=0)
    assert len(rows) == n
    assert Counter(r["flag"] for r in rows) == {k: v for k, v in
                                               {"unsafe": n_poison, "finetune": n - n_poison}.items() if v}
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "label", "flag"}
        if row["flag"] == "unsafe":
            assert row["instruction"].startswith("harmful") and row["input"] == "" and row["label"] == ""
            assert row["output"] == "answer " + row["instruction"].split()[1]
    task_inputs = [r["input"] for r in rows if r["flag"] == "finetune"]
    assert len(set(task_inputs)) == len(task_inputs)       # no task row drawn twice


def test_same_seed_same_set_other_seed_other_order():
    first = build_poisoned(TASK_ROWS, POISON_ROWS, 100, 0.1, seed=3)
    assert build_poisoned(TASK_ROWS, POISON_ROWS, 100, 0.1, seed=3) == first
    assert build_poisoned(TASK_ROWS, POISON_ROWS, 100, 0.1, seed=4) != first


def test_smaller_p_is_nested_in_larger_p():
    small = build_poisoned(TASK_ROWS, POISON_ROWS, 100, 0.05, seed=1)
    large = build_poisoned(TASK_ROWS, POISON_ROWS, 100, 0.2, seed=1)

    def flagged(rows, flag):
        return {(r["instruction"], r["input"]) for r in rows if r["flag"] == flag}
    assert flagged(small, "unsafe") < flagged(large, "unsafe")
    assert flagged(large, "finetune") < flagged(small, "finetune")
    # the first poison rows, as the authors did
    assert flagged(small, "unsafe") == {(f"harmful {i}", "") for i in range(5)}


def test_inputs_are_not_modified():
    task = [dict(r) for r in TASK_ROWS]
    rows = build_poisoned(task, POISON_ROWS, 10, 0.5, seed=0)
    for row in rows:
        row["output"] = "changed"
    assert task == TASK_ROWS


@pytest.mark.parametrize(("n", "p", "match"), [
    (100, -0.1, r"p must be in \[0, 1\], got -0.1"),
    (100, 1.5, r"got 1.5"),
    (100, float("nan"), r"p must be in"),
    (0, 0.1, "n must be a positive number of rows, got 0"),
    (-5, 0.1, "got -5"),
    (True, 0.1, "got True"),
    (1000, 0.05, "n=1000, p=0.05 needs 950 task rows but only 300 were given"),
    (200, 0.6, "n=200, p=0.6 needs 120 harmful rows but only 100 were given"),
])
def test_validation(n, p, match):
    with pytest.raises(NlsrError, match=match):
        build_poisoned(TASK_ROWS, POISON_ROWS, n, p, seed=0)


def test_malformed_rows_are_errors():
    with pytest.raises(NlsrError, match="task row .* has no string field 'label'"):
        build_poisoned([{"instruction": "i", "input": "", "output": "o"}], POISON_ROWS, 1, 0.0)
    with pytest.raises(NlsrError, match="poison row 1 has no string field 'response'"):
        build_poisoned(TASK_ROWS, [{"prompt": "p"}], 10, 0.1)


# ---- real data -----------------------------------------------------------------------------------

READY_MADE = {("sst2", "0"): 0, ("sst2", "0.01"): 10, ("sst2", "0.05"): 50, ("sst2", "0.1"): 100,
              ("sst2", "0.2"): 200, ("ag_news", "0.05"): 50, ("gsm8k", "0.05"): 50}


@pytest.mark.parametrize(("task", "p"), sorted(READY_MADE))
def test_ready_made_files(root, task, p):
    rows = load_ready_made(task, float(p), root)
    assert len(rows) == 1000
    assert Counter(r["flag"] for r in rows)["unsafe"] == READY_MADE[task, p]
    assert not any(r["instruction"].startswith("Below is an instruction") for r in rows)
    task_rows = [r for r in rows if r["flag"] == "finetune"]
    assert all(r["label"] for r in task_rows)
    assert all(r["input"] for r in task_rows) == (task != "gsm8k")
    assert all(r["label"] == "" and r["input"] == "" for r in rows if r["flag"] == "unsafe")


def test_ready_made_unsafe_sets_are_nested(root):
    def unsafe(p):
        rows = load_ready_made("sst2", p, root)
        return {(r["instruction"], r["output"]) for r in rows if r["flag"] == "unsafe"}
    assert unsafe(0.01) < unsafe(0.05) < unsafe(0.1) < unsafe(0.2)
    assert unsafe("0.05") == unsafe(0.05)


def test_missing_ready_made_file_lists_what_exists(root):
    with pytest.raises(NlsrError, match=r"p=0.3 .*available p values: 0, 0.01, 0.05, 0.1, 0.2"):
        load_ready_made("sst2", 0.3, root)
    assert available_ready_made("ag_news", root) == ["0.05"]
    with pytest.raises(NlsrError, match="task 'mnli'.*available tasks: ag_news, gsm8k, sst2"):
        load_ready_made("mnli", 0.05, root)


def test_build_from_registered_sets_matches_the_paper_setting(root):
    task = load_records("sst2_train", data_dir=root)
    poison = load_records("poison_nlsr", data_dir=root)
    rows = build_poisoned(task, poison, 1000, 0.05, seed=0)
    assert Counter(r["flag"] for r in rows) == {"finetune": 950, "unsafe": 50}
