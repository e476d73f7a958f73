"""The bundled data subset (nlsr/data/bundled): what the quick start runs on without a data folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, shared_data_dir
from nlsr import paths
from nlsr.data import load_records
from nlsr.data.bundled import make_bundle
from nlsr.errors import NlsrError
from nlsr.experiment.config import load_config
from nlsr.experiment.pipeline import RunContext
from nlsr.experiment.stages import data, reads

BUNDLE = paths.bundled_data_dir()
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
SOURCE = shared_data_dir()      # the full data folder ($NLSR_DATA_DIR or shared/data), None where absent
CODE = {"__init__.py", "make_bundle.py"}


def _bundle_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in CODE and "__pycache__" not in p.parts}


def _smoke_datasets(cfg) -> set[str]:
    return {*reads.eval_datasets(cfg), *reads.align_datasets(cfg), *reads.attack_datasets(cfg)}


def test_the_bundle_is_small_and_every_smoke_data_set_loads_from_it():
    manifest = json.loads((BUNDLE / paths.BUNDLE_MANIFEST).read_text())
    files = _bundle_files(BUNDLE)
    assert sum(len(b) for b in files.values()) < 3_000_000
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == entry["sha256"], rel
        assert 0 < entry["rows"] <= entry["source_rows"]
    folders = {Path(rel).parts[0] for rel in manifest["files"]}
    assert all(f"{folder}/SOURCES.md" in files for folder in folders)
    assert {"xstest/LICENSE", "jailbreakbench/LICENSE", "sst2/ALPS_LICENSE"} <= set(files)
    cfg = load_config(SMOKE)
    names = _smoke_datasets(cfg)
    assert {"safety_sft", "safety_dpo", "poison", "sst2_train", "harmful_eval", "xstest"} <= names
    for name in names:
        assert load_records(name, BUNDLE), name
    assert load_records("judge_jailbreakbench", BUNDLE)     # the trained judge reads these files too


def test_the_smoke_data_stages_run_on_the_bundle_and_record_it(tmp_path):
    cfg = load_config(SMOKE)
    ctx = RunContext(cfg, tmp_path, BUNDLE)
    for name, run in (("data", data.run_eval), ("data-align", data.run_align), ("data-attack", data.run_attack_data)):
        (tmp_path / name).mkdir()
        run(ctx, tmp_path / name, {"data-align": tmp_path / "data-align"})
        card = json.loads((tmp_path / name / "data_card.json").read_text())
        assert card["data_dir"] == {"path": "<nlsr bundled data>", "bundled": True}
    align = json.loads((tmp_path / "data-align" / "data_card.json").read_text())
    assert (align["sft"]["rows"], align["calibration"]["rows"], align["dpo"]["rows"]) == (32, 16, 16)
    assert reads.eval_content(ctx)["bundled_data"] is True
    other = tmp_path / "other"
    shutil.copytree(BUNDLE, other, ignore=shutil.ignore_patterns(paths.BUNDLE_MANIFEST, *CODE))
    assert "bundled_data" not in reads.eval_content(RunContext(cfg, tmp_path, other))
    assert data.data_folder(other) == {"path": f"{tmp_path.name}/other", "bundled": False}


def test_asking_for_more_rows_than_the_bundle_has_names_the_full_data_setting(tmp_path):
    cfg = load_config(SMOKE, ["evaluate.harmful_n=502"])
    with pytest.raises(NlsrError, match=r"evaluate\.harmful_n.*100 usable rows.*--data-dir, NLSR_DATA_DIR"):
        data.run_eval(RunContext(cfg, tmp_path, BUNDLE), tmp_path, {})
    cfg = load_config(SMOKE, ["align.sft.n=400"])
    with pytest.raises(NlsrError, match=r"bundled subset.*data_dir:"):
        data.run_align(RunContext(cfg, tmp_path, BUNDLE), tmp_path, {})
    with pytest.raises(NlsrError, match=r"not in the bundled data subset.*--data-dir"):
        load_records("gsm8k_train", BUNDLE)


def test_data_dir_falls_back_to_the_bundle_only_when_nothing_else_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("NLSR_DATA_DIR", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(paths, "_REPO_ROOT", tmp_path / "checkout")
    assert paths.data_dir() == BUNDLE and paths.is_bundled(paths.data_dir())
    assert "bundled data subset" in paths.describe_data_dir(paths.data_dir())
    assert "--data-dir" in paths.describe_data_dir(paths.data_dir())
    real = tmp_path / "shared" / "data"       # beside the working directory
    real.mkdir(parents=True)
    assert paths.data_dir() == real and not paths.is_bundled(real)
    assert paths.describe_data_dir(real) == str(real)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("NLSR_DATA_DIR", str(elsewhere))
    assert paths.data_dir() == elsewhere
    assert paths.data_dir(BUNDLE) == BUNDLE


def test_without_any_data_folder_nor_bundle_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("NLSR_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_REPO_ROOT", tmp_path / "checkout")
    monkeypatch.setattr(paths, "bundled_data_dir", lambda: tmp_path / "no-bundle")
    with pytest.raises(NlsrError, match="bundled subset .* is missing; pass --data-dir or set NLSR_DATA_DIR"):
        paths.data_dir()
    assert not paths.on_bundled_data()


def test_the_default_judges_trained_on_the_bundle_are_cached_apart(tmp_path, monkeypatch):
    from nlsr.evaluation.judges import hidden, training

    monkeypatch.setenv("NLSR_CACHE_DIR", str(tmp_path))
    assert training.default_dir() != training.default_dir(bundled=True)
    assert training.default_dir(bundled=True).name.endswith("-bundled")
    assert hidden.default_dir(bundled=True).name.endswith("-bundled") and not hidden.default_dir().name.endswith(
        "-bundled")


@pytest.mark.skipif(SOURCE is None, reason="no full data folder ($NLSR_DATA_DIR or shared/data) to rebuild from")
def test_make_bundle_reproduces_the_committed_bundle_from_the_full_data(tmp_path):
    source = tmp_path / "data"
    for folder in sorted({Path(p).parts[0] for p in json.loads((BUNDLE / paths.BUNDLE_MANIFEST).read_text())["files"]}):
        shutil.copytree(SOURCE / folder, source / folder)
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    out = tmp_path / "bundle"
    assert make_bundle.main([str(source), "--out", str(out)]) == 0
    assert _bundle_files(out) == _bundle_files(BUNDLE)
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before    # never written
    assert make_bundle.main([str(source), "--out", str(out)]) == 0                    # rerun: same bytes
    assert _bundle_files(out) == _bundle_files(BUNDLE)
    with pytest.raises(SystemExit):
        make_bundle.main([str(source), "--out", str(source / "inside")])
    for name in ("safety_sft", "safety_dpo", "harmful_eval", "sst2_eval", "harmful_advbench", "xstest",
                 "harmful_malicious_instruct", "gsm8k_eval"):      # the first records of the full sets
        bundled = load_records(name, BUNDLE)
        assert load_records(name, source, limit=len(bundled)) == bundled, name


def test_cut_keeps_the_original_text_of_each_format():
    text = b'[\n  {"a": 1},\n  {"a": [2, 3]},\n  {"a": "x, ]"}\n]\n'
    assert make_bundle.cut(text, "json", 2) == (b'[\n  {"a": 1},\n  {"a": [2, 3]}\n]\n', 2, 3)
    assert make_bundle.cut(text, "json", 5) == (text, 3, 3)
    wrapped = b'{"meta": {"n": 3}, "rows": [{"a": 1}, {"a": 2}], "end": true}'
    assert make_bundle.cut(wrapped, "json:rows", 1) == (b'{"meta": {"n": 3}, "rows": [{"a": 1}], "end": true}', 1, 2)
    csv = b'id,text\n1,"two\nlines"\n\n2,plain\n3,"a ""q"""\n'
    assert make_bundle.cut(csv, "csv", 2) == (b'id,text\n1,"two\nlines"\n\n2,plain\n', 2, 3)
    assert make_bundle.cut(b"h\tl\na\t1\n\nb\t0\nc\t1", "tsv", 2) == (b"h\tl\na\t1\n\nb\t0\n", 2, 3)
    assert make_bundle.cut(b'{"a": 1}\n{"a": 2}\n', "jsonl", 1) == (b'{"a": 1}\n', 1, 2)
