"""The command line answers at once: no heavy import before the arguments and paths are checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "safetensors", "sklearn", "matplotlib", "datasets")

# Runs the CLI in a fresh interpreter and reports the exit status, the time and the heavy
# modules that were imported.
PROBE = f"""
import json, sys, time
start = time.perf_counter()
from nlsr.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="nlsr")
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"code": code, "seconds": time.perf_counter() - start, "heavy": heavy}}))
"""


def probe(*args: str, cwd=None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_importing_the_cli_is_fast_and_light():
    code = ("import sys, time; t = time.perf_counter(); import nlsr.cli; "
            f"print(time.perf_counter() - t); print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    best = None
    for _ in range(2):  # the better of two, for a loaded machine
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        seconds, heavy = out.stdout.strip().splitlines()
        best = min(best or 1e9, float(seconds))
        assert heavy == "[]", f"`import nlsr.cli` imports {heavy}"
    # measured about 0.03 s (plus ~0.1 s interpreter start); a generous bound for a busy machine
    assert best < 1.0, f"import nlsr.cli took {best:.2f} s"


def test_help_answers_quickly():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nlsr.cli", "identify", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--reference" in done.stdout
    assert time.perf_counter() - start < 5.0


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
    assert result["seconds"] < 3.0, result      # about 0.1-0.3 s; generous for a shared machine
    assert list(tmp_path.iterdir()) == []


def test_a_config_error_is_reported_before_heavy_imports(tmp_path):
    (tmp_path / "c.yaml").write_text("name: ../../escape\n")
    result = probe("validate", "c.yaml", cwd=tmp_path)
    assert result["code"] == 2 and "single folder name" in result["stderr"], result
    assert result["heavy"] == [], result
