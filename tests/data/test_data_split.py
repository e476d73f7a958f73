"""Deterministic, disjoint splits of one data set (SFT / calibration / validation)."""

from __future__ import annotations

import pytest

from conftest import shared_data_dir
from nlsr.data import load_records, split_records
from nlsr.errors import NlsrError

RECORDS = [{"id": i} for i in range(100)]


def _ids(part):
    return [r["id"] for r in part]


def test_sizes_are_disjoint_and_deterministic():
    parts = split_records(RECORDS, [50, 30, 10], seed=0)
    assert [len(p) for p in parts] == [50, 30, 10]
    ids = [set(_ids(p)) for p in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [_ids(p) for p in split_records(RECORDS, [50, 30, 10], seed=0)] == [_ids(p) for p in parts]
    assert _ids(split_records(RECORDS, [50], seed=1)[0]) != _ids(parts[0])


def test_a_prefix_of_parts_does_not_depend_on_later_parts():
    assert split_records(RECORDS, [20], seed=5)[0] == split_records(RECORDS, [20, 70], seed=5)[0]


def test_fractions_summing_to_one_use_every_record():
    parts = split_records(RECORDS[:7], [0.5, 0.25, 0.25], seed=2)
    assert sum(len(p) for p in parts) == 7
    assert sorted(i for p in parts for i in _ids(p)) == list(range(7))


def test_partial_fractions():
    parts = split_records(RECORDS, [0.1, 0.2], seed=0)
    assert [len(p) for p in parts] == [10, 20]


def test_records_are_the_same_objects():
    (part,) = split_records(RECORDS, [3], seed=0)
    assert all(any(r is s for s in RECORDS) for r in part)


@pytest.mark.parametrize(("parts", "match"), [
    ([60, 50], "60 \\+ 50 = 110 exceed the 100 records"),
    ([10, -1], "non-negative"),
    ([0.5, 0.6], "sum to at most 1"),
    ([1.5], "in \\[0, 1\\]"),
    ([10, 0.5], "all sizes \\(ints\\) or all fractions"),
    ([True], "sizes \\(ints\\) or fractions"),
    ([], "at least one part"),
])
def test_bad_parts(parts, match):
    with pytest.raises(NlsrError, match=match):
        split_records(RECORDS, parts, seed=0)


def test_disjoint_sft_calibration_validation_from_one_file():
    root = shared_data_dir()
    if root is None:
        pytest.skip("offline data directory not found")
    rows = load_records("safety_sft", data_dir=root)
    sft, calibration, validation = split_records(rows, [2000, 2000, 516], seed=0)
    prompts = [{r["prompt"] for r in part} for part in (sft, calibration, validation)]
    assert sum(map(len, prompts)) == len(rows) == 4516
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
