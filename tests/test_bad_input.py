"""Every bad input the command line refuses: one error line, exit status 2, nothing written.

One row per case (issue 13 and the checks before it). Each case starts from a fresh folder with
tiny synthetic adapters (aligned, reference, fine-tuned, masks of the reference, a calibration
file), may change it, runs one command there, and checks the exit status, a phrase of the error
line, that no traceback was printed and that the folder is exactly as it was. Add a case whenever
a check is added.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, write_jsonl
from nlsr.cli import app
from nlsr.experiment.stages.realign import random_masks
from nlsr.method.extrapolate import extrapolate
from nlsr.method.masks import SafetyMasks, save_masks
from nlsr.weights import synthetic
from nlsr.weights.adapters import load_adapter, save_adapter

# The tiny Llama of conftest (hidden 32, intermediate 48, 4 heads of 8, 2 kv heads, 2 layers).
KIND_SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (16, 32), "mlp.up_proj": (48, 32),
               "mlp.down_proj": (32, 48)}
SHAPES = {f"model.layers.{i}.{kind}": shape for i in range(2) for kind, shape in KIND_SHAPES.items()}
QV_SHAPES = {name: shape for name, shape in SHAPES.items() if name.endswith(("q_proj", "v_proj"))}

runner = CliRunner()


def adapter(shapes=SHAPES, seed=0, base=None, rank=4):
    return synthetic.random_adapter(shapes, rank=rank, alpha=8, seed=seed, base=base)


@pytest.fixture
def work(tmp_path, tiny_model_dir, monkeypatch):
    """aligned/, ref/ (β = 0.9), finetuned/, masks.safetensors (of ref), calib.jsonl; cwd = here."""
    base = str(tiny_model_dir)
    aligned = adapter(base=base)
    save_adapter(aligned, tmp_path / "aligned")
    save_adapter(extrapolate(aligned, 0.9), tmp_path / "ref")
    save_adapter(synthetic.perturbed(aligned, 0.05, relative=True), tmp_path / "finetuned")
    save_masks(random_masks(load_adapter(tmp_path / "ref"), 0.2, seed=0), tmp_path / "masks.safetensors")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    (tmp_path / "c.yaml").write_text("name: x\nruns_dir: runs\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- helpers that spoil the inputs ------------------------------------------------------------

def truncate(relative: str, size: int = 40) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        path = d / relative
        path.write_bytes(path.read_bytes()[:size])
    return spoil


def write(relative: str, data: str | bytes) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        path = d / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return spoil


def edit_config(relative: str, **changes) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        path = d / relative / "adapter_config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return spoil


def edit_tensors(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = d / relative / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return spoil


def save(relative: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        save_adapter(make(d), d / relative, force=True)
    return spoil


def nan_first(tensors: dict) -> None:
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")


def drop_first_b(tensors: dict) -> None:
    del tensors[next(k for k in tensors if ".lora_B." in k)]


def pickled(d: Path) -> None:
    tensors = {}
    for name, f in load_adapter(d / "aligned"):
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.B
    (d / "pickled").mkdir()
    torch.save(tensors, d / "pickled" / "adapter_model.bin")
    shutil.copy(d / "aligned" / "adapter_config.json", d / "pickled")


def truncated_pickle(d: Path) -> None:
    pickled(d)
    truncate("pickled/adapter_model.bin", 60)(d)


def copy_config_only(d: Path) -> None:
    (d / "noweights").mkdir()
    shutil.copy(d / "aligned" / "adapter_config.json", d / "noweights")


def masks_of(make: Callable[[Path], object], relative: str = "other.safetensors", **meta):
    def spoil(d: Path) -> None:
        masks = random_masks(make(d), 0.2, seed=1)
        masks.metadata.update(meta)
        save_masks(masks, d / relative)
    return spoil


def old_masks(d: Path) -> None:
    masks = random_masks(load_adapter(d / "ref"), 0.2, seed=1)
    save_masks(SafetyMasks(masks.masks, {"rank_ratio": "0.8", "keep_fraction": "0.2"}), d / "old.safetensors")


def model_copy(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
    """A copy of the tiny model in model/, spoiled by ``spoil(model_dir)``."""
    def setup(d: Path) -> None:
        shutil.copytree(os.environ["NLSR_TEST_TINY_MODEL"], d / "model")
        spoil(d / "model")
    return setup


def truncate_weights(model: Path) -> None:
    path = next(model.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])


def unfinished_run(d: Path) -> None:
    (d / "runs" / "x" / "data").mkdir(parents=True)


def read_only(folder: str):
    """Make ``folder`` refuse new files the way a read-only file system does (the tests run as
    root, whom permission bits do not stop)."""
    def patch(d: Path, monkeypatch) -> None:
        import tempfile

        (d / folder).mkdir(exist_ok=True)
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if Path(kwargs.get("dir") or "").resolve() == (d / folder).resolve():
                raise OSError(errno.EROFS, "Read-only file system", str(d / folder))
            return real(*args, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return patch


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    phrase: str
    setup: Callable[[Path], None] | None = None
    patch: Callable | None = None

    def __str__(self) -> str:
        return self.id


REF = ("--reference", "ref")
IDENTIFY = ("identify", "--base", "{model}", *REF, "--calibration", "calib.jsonl", "--out", "m.safetensors")
REALIGN = ("realign", *REF, "--finetuned", "finetuned", "--masks", "masks.safetensors", "--out", "out")
SAFELORA = ("safelora", "--aligned", "aligned", "--finetuned", "finetuned", "--out", "out")
EXTRAPOLATE = ("extrapolate", "--out", "out", "--aligned")


def _with_options(command: tuple[str, ...], **replace) -> tuple[str, ...]:
    """``command`` with options replaced (``out="x"`` -> ``--out x``) or appended."""
    args = list(command)
    for option, value in replace.items():
        flag = "--" + option.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return tuple(args)


def identify_with(**replace) -> tuple[str, ...]:
    return _with_options(IDENTIFY, **replace)


def realign_with(**replace) -> tuple[str, ...]:
    return _with_options(REALIGN, **replace)


CASES = [
    # adapter directories (extrapolate reads one; every command shares the loader)
    Case("adapter-missing", (*EXTRAPOLATE, "nope"), "adapter directory 'nope' does not exist"),
    Case("adapter-is-a-file", (*EXTRAPOLATE, "calib.jsonl"), "is a file; give the adapter directory"),
    Case("adapter-no-config", (*EXTRAPOLATE, "empty"), "has no adapter_config.json", write("empty/x.txt", "")),
    Case("adapter-no-weights", (*EXTRAPOLATE, "noweights"), "has no adapter_model.safetensors", copy_config_only),
    Case("adapter-config-not-json", (*EXTRAPOLATE, "aligned"), "is not valid JSON",
         write("aligned/adapter_config.json", "{r: 4,")),
    Case("adapter-config-binary", (*EXTRAPOLATE, "aligned"), "is not valid JSON",
         write("aligned/adapter_config.json", b"\xff\xfe\x00\x81")),
    Case("adapter-config-a-list", (*EXTRAPOLATE, "aligned"), "not the object of a PEFT adapter config",
         write("aligned/adapter_config.json", "[1, 2]")),
    Case("adapter-config-lacks-r", (*EXTRAPOLATE, "aligned"), "lacks 'r' or 'lora_alpha'",
         edit_config("aligned", r=None)),
    Case("adapter-not-lora", (*EXTRAPOLATE, "aligned"), "nlsr works on LoRA adapters only",
         edit_config("aligned", peft_type="IA3")),
    Case("adapter-dora", (*EXTRAPOLATE, "aligned"), "DoRA adapter", edit_config("aligned", use_dora=True)),
    Case("adapter-rank-differs-from-config", (*EXTRAPOLATE, "aligned"), "but 8 in adapter_config.json",
         edit_config("aligned", r=8)),
    Case("adapter-truncated-weights", (*EXTRAPOLATE, "aligned"), "is not a readable safetensors adapter weights",
         truncate("aligned/adapter_model.safetensors")),
    Case("adapter-weights-are-text", (*EXTRAPOLATE, "aligned"), "is not a readable safetensors",
         write("aligned/adapter_model.safetensors", '{"prompt": "x"}\n')),
    Case("adapter-nan", (*EXTRAPOLATE, "aligned"), "contains NaN or Inf", edit_tensors("aligned", nan_first)),
    Case("adapter-foreign-tensor", (*EXTRAPOLATE, "aligned"), "is not a LoRA A/B weight",
         edit_tensors("aligned", lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}))),
    Case("adapter-missing-factor", (*EXTRAPOLATE, "aligned"), "has no lora_B weight",
         edit_tensors("aligned", drop_first_b)),
    Case("adapter-pickle-without-opt-in", (*EXTRAPOLATE, "pickled"), "pass --allow-pickle", pickled),
    Case("adapter-truncated-pickle", (*EXTRAPOLATE, "pickled", "--allow-pickle"),
         "could not be read as a torch state dict", truncated_pickle),
    # extrapolate's own options and every command's output checks
    Case("extrapolate-negative-beta", (*EXTRAPOLATE, "aligned", "--beta", "-1"), "--beta must be >= 0"),
    Case("output-exists", ("extrapolate", "--aligned", "aligned", "--out", "ref"), "already exists"),
    Case("output-folder-missing", ("extrapolate", "--aligned", "aligned", "--out", "no/such/out"),
         "does not exist; create it first"),
    Case("output-folder-is-a-file", ("extrapolate", "--aligned", "aligned", "--out", "calib.jsonl/out"),
         "is a file, not a folder"),
    Case("output-read-only", ("extrapolate", "--aligned", "aligned", "--out", "ro/out"), "is not writable",
         patch=read_only("ro")),
    # inspect
    Case("inspect-missing", ("inspect", "nope"), "adapter directory 'nope' does not exist"),
    Case("inspect-truncated-weights", ("inspect", "aligned"), "not a readable safetensors",
         truncate("aligned/adapter_model.safetensors")),
    # identify: options, then inputs, then the model
    Case("identify-batch-size-0", identify_with(batch_size="0"), "--batch-size must be >= 1"),
    Case("identify-limit-0", identify_with(limit="0"), "--limit must be >= 1"),
    Case("identify-max-length-0", identify_with(max_length="0"), "--max-length must be >= 1"),
    Case("identify-rank-ratio-0", identify_with(rank_ratio="0"), "--rank-ratio must be in (0, 1]"),
    Case("identify-keep-above-1", identify_with(keep="1.5"), "--keep must be in (0, 1]"),
    Case("identify-unknown-template", identify_with(template="vicuna"), "unknown --template 'vicuna'"),
    Case("identify-unknown-precision", identify_with(precision="fp8"), "unknown --precision 'fp8'"),
    Case("identify-unknown-device", identify_with(device="gpu0"), "--device 'gpu0' is not a device"),
    Case("identify-reference-missing", identify_with(reference="nope"), "adapter directory 'nope' does not exist"),
    Case("identify-reference-truncated", IDENTIFY, "not a readable safetensors",
         truncate("ref/adapter_model.safetensors")),
    Case("identify-calibration-missing", identify_with(calibration="nope.jsonl"),
         "calibration file 'nope.jsonl' does not exist"),
    Case("identify-calibration-empty", IDENTIFY, "has no rows", write("calib.jsonl", "\n")),
    Case("identify-calibration-without-fields", IDENTIFY, "has no non-empty string field 'response'",
         write("calib.jsonl", '{"prompt": "x", "answer": "y"}\n')),
    Case("identify-calibration-not-json", IDENTIFY, "row 1: not valid JSON", write("calib.jsonl", "prompt,response\n")),
    Case("identify-calibration-binary", IDENTIFY, "not UTF-8 text", write("calib.jsonl", b"\x89PNG\r\n\x1a\n\xff\xfe")),
    Case("identify-masks-given-as-calibration", identify_with(calibration="masks.safetensors"), "not UTF-8 text"),
    Case("identify-base-path-missing", identify_with(base="./no-model"), "model path './no-model' does not exist"),
    Case("identify-base-without-config", identify_with(base="aligned"), "has no config.json"),
    Case("identify-base-config-malformed", (*identify_with(base="model"), "--allow-base-mismatch"),
         "cannot load the model 'model'",
         model_copy(lambda m: (m / "config.json").write_text("{not json"))),
    Case("identify-base-weights-truncated", (*identify_with(base="model"), "--allow-base-mismatch"),
         "cannot load the model 'model'",
         model_copy(truncate_weights)),
    Case("identify-base-differs-from-reference", IDENTIFY, "pass --allow-base-mismatch",
         edit_config("ref", base_model_name_or_path="org/another-model")),
    Case("identify-output-exists", identify_with(out="calib.jsonl"), "already exists"),
    Case("identify-output-read-only", identify_with(out="ro/m.safetensors"), "is not writable",
         patch=read_only("ro")),
    # realign: options, inputs, masks
    Case("realign-unknown-select", realign_with(select="best"), "unknown --select 'best'"),
    Case("realign-unknown-transplant", realign_with(transplant="row"), "unknown --transplant 'row'"),
    Case("realign-threshold-rule-without-threshold", realign_with(select="threshold"), "needs --threshold"),
    Case("realign-p-base-epsilon", realign_with(p_base="0.9", epsilon="0.2"), "must stay in [0, 1]"),
    Case("realign-min-origin-cosine-above-1", realign_with(min_origin_cosine="2"), "at most 1"),
    Case("realign-finetuned-missing", realign_with(finetuned="nope"), "adapter directory 'nope' does not exist"),
    Case("realign-finetuned-truncated", REALIGN, "not a readable safetensors",
         truncate("finetuned/adapter_model.safetensors")),
    Case("realign-masks-missing", realign_with(masks="nope.safetensors"),
         "mask file 'nope.safetensors' does not exist"),
    Case("realign-masks-truncated", REALIGN, "is not a readable safetensors masks file",
         truncate("masks.safetensors", 100)),
    Case("realign-masks-is-jsonl", realign_with(masks="calib.jsonl"), "is not a readable safetensors masks file"),
    Case("realign-masks-is-adapter-weights", realign_with(masks="ref/adapter_model.safetensors"),
         "expected bool"),
    Case("realign-masks-of-another-reference", realign_with(masks="other.safetensors"),
         "were identified on another reference adapter", masks_of(lambda d: adapter(seed=7))),
    Case("realign-masks-cover-other-modules", realign_with(masks="other.safetensors"),
         "masked modules are not in the reference adapter",
         lambda d: (save("ref", lambda d: adapter(QV_SHAPES))(d), save("finetuned", lambda d: adapter(QV_SHAPES))(d),
                    masks_of(lambda d: adapter())(d))),
    Case("realign-masks-miss-modules", realign_with(masks="other.safetensors"), "have no masks",
         masks_of(lambda d: adapter(QV_SHAPES))),
    Case("realign-masks-without-record", realign_with(masks="old.safetensors"),
         "do not record which reference adapter", old_masks),
    Case("realign-rank-mismatch", realign_with(finetuned="rank2"), "rank 4 in the reference adapter but 2",
         save("rank2", lambda d: adapter(rank=2, base=load_adapter(d / "ref").base_model))),
    Case("realign-base-mismatch", REALIGN, "pass --allow-base-mismatch",
         edit_config("finetuned", base_model_name_or_path="org/another-model")),
    Case("realign-unrelated-finetune", realign_with(finetuned="fresh"), "does not continue the aligned one",
         save("fresh", lambda d: adapter(seed=5, base=load_adapter(d / "ref").base_model))),
    # safelora
    Case("safelora-num-modules-0", (*SAFELORA, "--num-modules", "0"), "--num-modules must be >= 1"),
    Case("safelora-num-modules-too-many", (*SAFELORA, "--num-modules", "99"), "between 1 and 8"),
    Case("safelora-both-rules", (*SAFELORA, "--num-modules", "2", "--threshold", "0.5"), "exactly one of"),
    Case("safelora-no-rule", SAFELORA, "exactly one of"),
    Case("safelora-unaligned-missing", (*SAFELORA, "--num-modules", "2", "--unaligned", "nope"),
         "--unaligned: adapter directory 'nope' does not exist"),
    # run / validate: the config
    Case("run-config-missing", ("run", "nope.yaml"), "config file 'nope.yaml' does not exist"),
    Case("run-config-not-yaml", ("run", "bad.yaml"), "is not valid YAML", write("bad.yaml", "name: [x\n")),
    Case("run-config-binary", ("run", "bad.yaml"), "is not UTF-8 text", write("bad.yaml", b"\xff\xfe\x00name")),
    Case("run-config-not-a-mapping", ("run", "bad.yaml"), "must hold a mapping", write("bad.yaml", "- x\n")),
    Case("run-name-escapes-runs-folder", ("run", "c.yaml", "--set", "name=../../escape"),
         "run name '../../escape' must be a single folder name"),
    Case("validate-name-escapes-runs-folder", ("validate", "c.yaml", "--set", "name=../../escape"),
         "must be a single folder name"),
    Case("validate-name-with-separator", ("validate", "c.yaml", "--set", "name=a/b"), "must be a single folder name"),
    Case("validate-name-dotdot", ("validate", "c.yaml", "--set", "name=.."), "must be a single folder name"),
    Case("validate-variant-name-with-separator", ("validate", "c.yaml", "--set", "realign.variants=[{name: a/b}]"),
         "variant name 'a/b' must be a single folder name"),
    Case("validate-safelora-num-modules-0",
         ("validate", "c.yaml", "--set", "realign.variants=[{name: s, method: safelora, num_modules: 0}]"),
         "num_modules"),
    Case("validate-bad-value", ("validate", "c.yaml", "--set", "attack.p=1.5"), "p must be in [0, 1]"),
    Case("validate-unknown-field", ("validate", "c.yaml", "--set", "attack.pp=1"), "attack.pp"),
    Case("validate-override-without-equals", ("validate", "c.yaml", "--set", "attack.p"),
         "must look like section.field=value"),
    Case("validate-override-not-yaml", ("validate", "c.yaml", "--set", "attack.p=[1"), "not valid YAML"),
    Case("validate-unknown-judge", ("validate", "c.yaml", "--set", "evaluate.judges=[refusal, gpt]"),
         "evaluate.judges.1: Value error, unknown judge 'gpt' (known: beaverdam, hidden,"),
    Case("run-judge-without-model", ("run", "c.yaml", "--set", "evaluate.judges=[{name: llamaguard}]"),
         "judge 'llamaguard' needs a model: write {name: llamaguard, model: FOLDER_OR_HUB_ID}"),
    Case("run-judge-twice", ("run", "c.yaml", "--set", "evaluate.judges=[trained, trained]"),
         "give each a distinct label"),
    Case("run-unknown-precision", ("run", "c.yaml", "--precision", "fp8"), "unknown --precision 'fp8'"),
    Case("run-data-dir-missing", ("run", "c.yaml", "--data-dir", "nope"), "data directory 'nope' does not exist"),
    # export / compare
    Case("export-run-missing", ("export", "runs/nope", "exported"), "run folder 'runs/nope' does not exist"),
    Case("export-run-unfinished", ("export", "runs/x", "exported"), "has no finished report stage", unfinished_run),
    Case("compare-run-missing", ("compare", "runs/nope", "--out", "cmp"), "run folder 'runs/nope' does not exist"),
    Case("compare-results-not-json", ("compare", "exp", "--out", "cmp"), "'exp/results.json' is not valid JSON",
         lambda d: (write("exp/results.json", "[{")(d), write("exp/manifests.json", "{}")(d))),
    Case("compare-output-exists", ("compare", "exp", "--out", "calib.jsonl"), "already exists", write("exp/x", "")),
    # judges
    Case("judge-unknown", ("judge", "validate", "--judge", "gpt"), "unknown judge 'gpt'"),
    Case("judge-validate-max-prompts-0", ("judge", "validate", "--judge", "refusal", "--max-prompts", "0"),
         "--max-prompts must be >= 1"),
    Case("judge-train-max-prompts-0", ("judge", "train", "--max-prompts", "0", "--out", "j"),
         "--max-prompts must be >= 1"),
    Case("judge-train-data-dir-missing", ("judge", "train", "--data-dir", "nope", "--out", "j"),
         "data directory 'nope' does not exist"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, work, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NLSR_TEST_TINY_MODEL", str(tiny_model_dir))
    monkeypatch.delenv("NLSR_DEBUG", raising=False)
    if case.setup:
        case.setup(work)
    if case.patch:
        case.patch(work, monkeypatch)
    before = snapshot(work)
    model_before = snapshot(tiny_model_dir)
    args = [a.replace("{model}", str(tiny_model_dir)) for a in case.args]
    result = runner.invoke(app, args)
    output = result.output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    assert case.phrase in errors[0], output
    assert snapshot(work) == before
    assert snapshot(tiny_model_dir) == model_before
