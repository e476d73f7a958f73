"""Every data set declares exactly the files its loader reads: those files' hashes enter the data
stages' keys (nlsr.experiment.provenance), so a file read but not declared would let stale stages survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import shared_data_dir
from nlsr.data import DATASETS, dataset_files, load_records
from nlsr.data.registry import DataFiles

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the offline data folder (shared/data) is absent")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_declared_files_are_the_files_read(name, monkeypatch):
    read: set[Path] = set()
    real_path, real_glob = DataFiles.path, DataFiles.glob

    def path(self, relative):
        found = real_path(self, relative)
        read.add(found)
        return found

    def glob(self, pattern):
        found = real_glob(self, pattern)
        read.update(found)
        return found

    monkeypatch.setattr(DataFiles, "path", path)
    monkeypatch.setattr(DataFiles, "glob", glob)
    load_records(name, data_dir=DATA)
    declared = dataset_files(name, DATA)
    assert declared and set(declared) == read


def test_missing_files_are_left_out(tmp_path):
    assert dataset_files("harmful_eval", tmp_path) == []
    (tmp_path / "jailbreakbench").mkdir()
    (tmp_path / "jailbreakbench" / "b.json").write_text("{}")
    (tmp_path / "jailbreakbench" / "a.json").write_text("{}")
    assert [p.name for p in dataset_files("judge_jailbreakbench", tmp_path)] == ["a.json", "b.json"]
