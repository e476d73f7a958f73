"""results/cpu-bench/aligned_check.py (it reproduces the validation numbers of alignment_choice.md)
answers bad input with a message, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "cpu-bench" / "aligned_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_folder_without_generations_is_named_and_exits_nonzero(tmp_path: Path) -> None:
    result = _run(str(tmp_path))
    assert result.returncode == 1
    assert "no generations.jsonl" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_help_exits_zero_with_usage() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "aligned_check.py" in result.stdout


def test_template_turns_count_the_validation_answers_of_one_kind() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("aligned_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"set": "xstest", "split": "validation", "output": "Paris.\n\n### Response:\nParis."},
            {"set": "xstest", "split": "validation", "output": "Use # for comments."},
            {"set": "xstest", "split": "test", "output": "### Response:"},
            {"set": "harmful", "split": "validation", "output": "I cannot help with that."}]
    assert module.template_turns(rows, "xstest").mean == 50.0
    assert module.template_turns(rows, "harmful").mean == 0.0
    assert module.template_turns(rows, "task") is None
