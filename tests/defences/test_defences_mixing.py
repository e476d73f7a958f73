"""VLGuard-style mixing: exact proportions, schema, determinism and input checks."""

import pytest

from nlsr.errors import NlsrError
from nlsr.training.defences.mixing import FLAG_SAFETY, mix_safety_rows, safety_count


def _task(n):
    return [{"instruction": "Classify", "input": f"text {i}", "output": "positive", "label": "positive",
             "flag": "finetune" if i % 10 else "unsafe"} for i in range(n)]


def _safety(n):
    return [{"prompt": f"harmful {i}", "response": f"I can't help with that ({i})."} for i in range(n)]


def test_safety_rows_are_the_given_fraction_of_the_final_set():
    rows = mix_safety_rows(_task(90), _safety(40), fraction=0.1, seed=0)
    safety = [r for r in rows if r["flag"] == FLAG_SAFETY]
    assert len(rows) == 100 and len(safety) == 10
    assert len(safety) / len(rows) == pytest.approx(0.1)
    assert all(set(r) == {"instruction", "input", "output", "label", "flag"} for r in rows)
    assert all(r["input"] == "" and r["label"] == "" and r["instruction"].startswith("harmful") for r in safety)
    assert len({r["instruction"] for r in safety}) == 10  # no duplicates
    # every task row is kept, with its flag
    kept = sorted((r["input"], r["flag"]) for r in rows if r["flag"] != FLAG_SAFETY)
    assert kept == sorted((r["input"], r["flag"]) for r in _task(90))


@pytest.mark.parametrize(("n_task", "fraction", "expected"), [(1000, 0.1, 111), (900, 0.1, 100), (95, 0.05, 5),
                                                              (10, 0.0, 0), (3, 0.5, 3)])
def test_safety_count(n_task, fraction, expected):
    assert safety_count(n_task, fraction) == expected
    rows = mix_safety_rows(_task(n_task), _safety(200), fraction=fraction)
    assert sum(r["flag"] == FLAG_SAFETY for r in rows) == expected
    assert len(rows) == n_task + expected


def test_mixing_is_deterministic_and_shuffled():
    first = mix_safety_rows(_task(90), _safety(40), seed=3)
    assert first == mix_safety_rows(_task(90), _safety(40), seed=3)
    other = mix_safety_rows(_task(90), _safety(40), seed=4)
    assert first != other
    positions = [i for i, r in enumerate(first) if r["flag"] == FLAG_SAFETY]
    assert positions != list(range(90, 100))  # not simply appended


def test_task_rows_without_flag_get_finetune_and_inputs_are_not_modified():
    task = [{k: v for k, v in r.items() if k != "flag"} for r in _task(9)]
    safety = _safety(5)
    rows = mix_safety_rows(task, safety, fraction=0.1)
    assert sorted(r["flag"] for r in rows) == ["finetune"] * 9 + [FLAG_SAFETY]
    assert all("flag" not in r for r in task) and safety == _safety(5)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_is_rejected(fraction):
    with pytest.raises(NlsrError, match="fraction"):
        mix_safety_rows(_task(10), _safety(100), fraction=fraction)


def test_too_few_or_malformed_rows_are_rejected():
    with pytest.raises(NlsrError, match="need 100 safety rows but only 40"):
        mix_safety_rows(_task(900), _safety(40), fraction=0.1)
    with pytest.raises(NlsrError, match="at least one task row"):
        mix_safety_rows([], _safety(4))
    with pytest.raises(NlsrError, match="task row 1"):
        mix_safety_rows([{"instruction": "x"}], _safety(4), fraction=0.5)
    with pytest.raises(NlsrError, match="'prompt' and 'response'"):
        mix_safety_rows(_task(9), [{"instruction": "x", "output": "y"}], fraction=0.1)
