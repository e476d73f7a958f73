"""The cross-setting comparison table: layout, the paper's numbers, rankings, plots, bad input."""

import json

import pytest

from nlsr.errors import NlsrError
from nlsr.experiment.comparison import hs_ranking, load_setting, write_comparison


def _row(model: str, hs: float, fa: float, seconds: float = 10.0) -> dict:
    return {"model": model, "seconds": seconds, "eval_seconds": 5.0,
            "metrics": {"hs": {"trained": hs, "refusal": hs + 1}, "fa": fa, "xstest_refusal": hs / 2,
                        "n": {"harmful": 20, "task": 30, "xstest": 4}}}


def _export(path, task: str, p: float, rows: list[dict]):
    path.mkdir()
    (path / "results.json").write_text(json.dumps(rows))
    (path / "manifests.json").write_text(json.dumps(
        {"data": {"params": {"attack": {"task": task, "p": p, "n": 100}}}}))
    return path


def test_table_in_the_papers_layout_with_its_numbers(tmp_path):
    first = _export(tmp_path / "a", "sst2", 0.05, [_row("nlsr", 30.0, 90.0), _row("attacked", 60.0, 91.0),
                                                    _row("lisa", 20.0, 50.0), _row("my-variant", 40.0, 89.0)])
    second = _export(tmp_path / "b", "gsm8k", 0.05, [_row("attacked", 50.0, 20.0), _row("nlsr", 10.0, 21.0)])
    write_comparison([first, second], tmp_path / "out", ["trained"])
    text = (tmp_path / "out" / "comparison.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | sst2 p=0.05: ours | sst2 p=0.05: paper | gsm8k p=0.05: ours | gsm8k p=0.05: paper |"
    names = [r.split(" | ")[0][2:] for r in rows[1:5]]
    assert names == ["Aligned (no defence)", "Lisa", "NLSR", "my-variant"]     # paper order, then the rest
    assert rows[3] == "| NLSR | 30.0 / 90.0 | 20.4 / 95.2 | 10.0 / 21.0 | 15.4 / 55.6 |"
    assert rows[2] == "| Lisa | 20.0 / 50.0 | 45.0 | - | - |"                  # the paper gives only HS
    over_refusal = text[text.index("### Over-refusal"):]
    assert "| Lisa | 10.0 | - |" in over_refusal
    assert "ours Lisa < NLSR < Aligned (no defence); paper NLSR < Lisa < Aligned (no defence)" in text
    assert (tmp_path / "out" / "hs_vs_fa_trained.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved[1]["paper"]["nlsr"] == [15.4, 55.6]


def test_ranking_is_safest_first():
    assert hs_ranking({"a": 3.0, "b": 1.0, "c": 2.0}) == ["b", "c", "a"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(NlsrError, match="neither a finished run folder"):
        load_setting(tmp_path)
    run = _export(tmp_path / "a", "sst2", 0.2, [_row("nlsr", 1.0, 2.0)])
    with pytest.raises(NlsrError, match="judges \\['beaverdam'\\]"):
        write_comparison([run], tmp_path / "out", ["beaverdam"])
    assert not (tmp_path / "out").exists()


def test_hs_against_p_takes_the_benign_control_as_the_undefended_point_at_p_zero(tmp_path):
    def scored(model: str, hs: float) -> dict:
        row = _row(model, hs, 90.0)
        row["seeds"] = [0]
        row["scores"] = {"hs": {"trained": {"test": {"mean": hs, "ci95": [hs - 2, hs + 2]}}}}
        return row

    low = _export(tmp_path / "p05", "sst2", 0.05, [scored("attacked", 30.0), scored("attacked-p0", 5.0),
                                                   scored("nlsr", 12.0)])
    high = _export(tmp_path / "p20", "sst2", 0.2, [scored("attacked", 60.0), scored("nlsr", 20.0)])
    other = _export(tmp_path / "gsm", "gsm8k", 0.05, [scored("attacked", 40.0)])     # one p: no curve
    write_comparison([high, low, other], tmp_path / "out", ["trained"])
    curves = json.loads((tmp_path / "out" / "hs_vs_p_trained.json").read_text())
    assert list(curves) == ["sst2"]
    assert [(pt["p"], pt["mean"]) for pt in curves["sst2"]["attacked"]] == [(0.0, 5.0), (0.05, 30.0), (0.2, 60.0)]
    assert [pt["p"] for pt in curves["sst2"]["nlsr"]] == [0.05, 0.2]
    assert (tmp_path / "out" / "hs_vs_p_trained.png").stat().st_size > 1000


def test_force_replaces_only_the_comparisons_own_files(tmp_path):
    run = _export(tmp_path / "a", "sst2", 0.05, [_row("attacked", 60.0, 91.0), _row("nlsr", 30.0, 90.0)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("how this folder was made")        # the user's notes
    (out / "run-p0.2").mkdir()                                         # an export kept beside it
    (out / "run-p0.2" / "report.md").write_text("kept")
    (out / "hs_vs_fa_refusal.png").write_bytes(b"stale plot of a judge no longer compared")
    (out / "comparison.md").write_text("old table")
    with pytest.raises(NlsrError, match="already exists"):
        write_comparison([run], out, ["trained"])
    write_comparison([run], out, ["trained"], force=True)
    assert (out / "README.md").read_text() == "how this folder was made"
    assert (out / "run-p0.2" / "report.md").read_text() == "kept"
    assert "old table" not in (out / "comparison.md").read_text()
    assert not (out / "hs_vs_fa_refusal.png").exists()                 # its own stale output is replaced
    assert not list(tmp_path.glob(".out.*"))                           # no temporary folder left behind
