"""The command line answers at once: no heavy import before the arguments and paths are checked.

What is asserted is the cause of a fast answer (no torch, transformers, ... imported), not a time:
timings belong in benchmarks, and this machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "safetensors", "sklearn", "matplotlib", "datasets")

# Runs the CLI in a fresh interpreter and reports the exit status and the heavy
# modules that were imported.
PROBE = f"""
import json, sys
from nlsr.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="nlsr")
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def probe(*args: str, cwd=None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_importing_the_cli_is_light():
    code = f"import sys; import nlsr.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", f"`import nlsr.cli` imports {out.stdout.strip()}"


def test_help_answers_without_heavy_imports():
    result = probe("identify", "--help")
    assert result["code"] == 0 and result["heavy"] == [], result


@pytest.mark.parametrize("args, phrase", [
    (("extrapolate", "--aligned", "nope", "--out", "x"), "does not exist"),
    (("identify", "--base", "smollm2", "--reference", "nope", "--calibration", "c.jsonl", "--out", "m"),
     "does not exist"),
    (("identify", "--base", "smollm2", "--reference", "nope", "--calibration", "c.jsonl", "--out", "m",
      "--batch-size", "0"), "--batch-size"),
    (("realign", "--reference", "nope", "--finetuned", "nope", "--masks", "m", "--out", "x"), "does not exist"),
    (("realign", "--reference", "r", "--finetuned", "f", "--masks", "m", "--out", "x", "--select", "best"),
     "unknown --select"),
    (("safelora", "--aligned", "nope", "--finetuned", "nope", "--num-modules", "0", "--out", "x"),
     "--num-modules"),
    (("inspect", "nope"), "does not exist"),
    (("run", "nope.yaml"), "does not exist"),
    (("validate", "nope.yaml"), "does not exist"),
    (("export", "nope", "x"), "does not exist"),
    (("compare", "nope", "--out", "x"), "does not exist"),
    (("judge", "train", "--data-dir", "nope", "--out", "j"), "does not exist"),
    (("judge", "validate", "--judge", "gpt"), "unknown judge"),
], ids=lambda v: "-".join(v[:1] + v[-2:]) if isinstance(v, tuple) else None)
def test_missing_inputs_and_bad_arguments_are_reported_before_heavy_imports(tmp_path, args, phrase):
    result = probe(*args, cwd=tmp_path)
    assert result["code"] == 2, result
    assert phrase in result["stderr"], result
    assert result["heavy"] == [], f"imported {result['heavy']} before reporting: {result['stderr']}"
    assert list(tmp_path.iterdir()) == []


def test_a_config_error_is_reported_before_heavy_imports(tmp_path):
    (tmp_path / "c.yaml").write_text("name: ../../escape\n")
    result = probe("validate", "c.yaml", cwd=tmp_path)
    assert result["code"] == 2 and "single folder name" in result["stderr"], result
    assert result["heavy"] == [], result
