"""The README's main job: the whole smoke pipeline on the embedded SmolLM2 (slow: minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, pipeline_data_dir
from nlsr.paths import bundled_data_dir

pytestmark = pytest.mark.slow


def _nlsr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nlsr.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=3600)


def test_smoke_pipeline_runs_end_to_end_and_resumes(tmp_path: Path):
    # the full data folder where there is one (nlsr finds it as the test does), else the bundled subset
    # that ships in the package: never skipped, and a failure when even the bundle is missing
    data = pipeline_data_dir()
    bundled = data == bundled_data_dir()
    runs = tmp_path / "runs"
    first = _nlsr("run", "configs/smoke.yaml", "--set", f"runs_dir={runs}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ("the bundled data subset" in first.stdout) == bundled, first.stdout[:2000]
    run_dir = runs / "smoke"
    card = json.loads((run_dir / "data" / "data_card.json").read_text())
    assert card["data_dir"]["bundled"] == bundled
    report = (run_dir / "report" / "report.md").read_text()
    for model in ("aligned", "attacked", "nonaligned", "nlsr", "nlsr-reverse", "nlsr-factor", "safelora"):
        assert f"| {model} |" in report
    assert "HS (refusal)" in report and "HS (trained)" in report
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert all(0 <= r["metrics"]["fa"] <= 100 for r in results)
    assert (run_dir / "report" / "hs_vs_fa_refusal.png").exists()
    stages = [p for p in run_dir.iterdir() if p.is_dir()]
    assert not [p for p in stages if p.name.endswith(".partial")]
    assert all((p / "manifest.json").exists() for p in stages)

    again = _nlsr("run", "configs/smoke.yaml", "--set", f"runs_dir={runs}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run]" not in again.stdout and again.stdout.count("[skip]") == len(stages)

    copy = _nlsr("run", "configs/smoke.yaml", "--set", f"runs_dir={runs}", "--set", "name=smoke-copy",
                 "--set", f"reuse_from=[{run_dir}]")
    assert copy.returncode == 0, copy.stderr[-3000:]
    assert "[run]" not in copy.stdout and copy.stdout.count("[reuse]") == len(stages)
    assert (runs / "smoke-copy" / "report" / "report.md").read_text() == report


def test_bad_config_fails_before_training(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO_ROOT / "configs" / "smoke.yaml").read_text().replace("p: 0.1", "p: 1.5"))
    result = _nlsr("run", str(bad), "--set", f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 2 and "attack.p" in result.stderr
    assert not (tmp_path / "runs").exists()
    result = _nlsr("run", "configs/smoke.yaml", "--set", "align.sft.dataset=nope",
                   "--set", f"runs_dir={tmp_path / 'runs2'}")
    assert result.returncode == 2 and "nope" in result.stderr
    assert not list((tmp_path / "runs2").glob("*/align_sft"))

