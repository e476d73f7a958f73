"""Bad input at neuron granularity and for model directories: one error line, exit 2, nothing written.

The pattern of tests/test_bad_input.py: each case starts from a fresh folder (a reference adapter,
a fresh fine-tuned adapter of another rank, neuron and entry masks of the reference, model
directories W_a / reference / full fine-tune with neuron masks of that reference), may spoil it,
runs one command and checks the exit status, a phrase of the error line, and that the folder is
exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_bad_input import KIND_SHAPES, QV_SHAPES, SHAPES, snapshot
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, write_jsonl
from nlsr.cli import app
from nlsr.experiment.stages.realign import random_masks
from nlsr.method.masks import SafetyMasks, neuron_key, save_masks
from nlsr.weights import synthetic
from nlsr.weights.adapters import load_adapter, save_adapter
from nlsr.weights.model_dirs import ModelDir, extrapolate_model, merge_adapter, model_fingerprint, module_of

runner = CliRunner()


def adapter(shapes=SHAPES, seed=0, base=None, rank=4, std=0.3):
    return synthetic.random_adapter(shapes, rank=rank, alpha=8, seed=seed, base=base, a_std=std, b_std=std)


def neuron_masks(rows: dict[str, int], fp: dict, seed: int = 0) -> SafetyMasks:
    gen = torch.Generator().manual_seed(seed)
    return SafetyMasks({neuron_key(n): torch.rand(d, generator=gen) < 0.3 for n, d in rows.items()},
                       {"granularity": "neuron", "reference_fingerprint": json.dumps(fp)})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """W_a (tiny + a small LoRA), ref (ExPO of it), ft (a full fine-tune of W_a), an unrelated model
    of the same shapes, and neuron masks of ref."""
    from conftest import make_model

    d = tmp_path_factory.mktemp("neuron-bad-models")
    aligned = adapter(base=str(tiny_model_dir), std=0.02)
    merge_adapter(ModelDir(tiny_model_dir), aligned, d / "W_a")
    extrapolate_model(ModelDir(d / "W_a"), ModelDir(tiny_model_dir), 0.9, d / "ref")
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(d / "W_a")
    with torch.no_grad():
        for p in ft.parameters():
            p += 0.001 * torch.randn_like(p)
    ft.save_pretrained(d / "ft")
    make_model(ft.config.vocab_size, seed=7).save_pretrained(d / "other")
    ref = ModelDir(d / "ref")
    names = [module_of(w) for w in ref.layer_linear_weights() if w.rsplit(".", 2)[-2] in
             {k.split(".")[-1] for k in KIND_SHAPES}]
    masks = neuron_masks({n: ref.shape(f"{n}.weight")[0] for n in names}, model_fingerprint(ref, names))
    save_masks(masks, d / "model-masks.safetensors")
    return d


@pytest.fixture
def work(tmp_path, tiny_model_dir, models, monkeypatch):
    base = str(tiny_model_dir)
    save_adapter(adapter(base=base), tmp_path / "ref")
    save_adapter(adapter(seed=5, rank=8, base=base), tmp_path / "ft")
    ref = load_adapter(tmp_path / "ref")
    from nlsr.weights.adapters import fingerprint

    save_masks(neuron_masks({n: f.B.shape[0] for n, f in ref}, fingerprint(ref)), tmp_path / "neuron.safetensors")
    save_masks(random_masks(ref, 0.2, seed=0), tmp_path / "entry.safetensors")
    for name in ("W_a", "ref", "ft", "other"):
        shutil.copytree(models / name, tmp_path / f"m_{name}")
    shutil.copy(models / "model-masks.safetensors", tmp_path / "model-masks.safetensors")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save(relative: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        save_adapter(make(d), d / relative, force=True)
    return spoil


def edit_config(relative: str, **changes) -> Callable[[Path], None]:
    def spoil(d: Path) -> None:
        path = d / relative / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return spoil


def bin_only(relative: str) -> Callable[[Path], None]:
    """A model directory whose weights are a pickle (pytorch_model.bin), not safetensors."""
    def spoil(d: Path) -> None:
        folder = d / relative
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return spoil


def other_shapes(d: Path) -> None:
    from transformers import LlamaForCausalLM

    from conftest import make_model

    model = make_model(300, seed=3)
    config = model.config
    config.intermediate_size = 64
    LlamaForCausalLM(config).save_pretrained(d / "m_wide")


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    phrase: str
    setup: Callable[[Path], None] | None = None

    def __str__(self) -> str:
        return self.id


NEURON = ("realign", "--granularity", "neuron", "--reference", "ref", "--finetuned", "ft",
          "--masks", "neuron.safetensors", "--out", "out")
MODELS = ("realign", "--granularity", "neuron", "--reference", "m_ref", "--finetuned", "m_ft", "--base",
          "m_W_a", "--masks", "model-masks.safetensors", "--out", "out")


def replace(command: tuple[str, ...], **changes) -> tuple[str, ...]:
    args = list(command)
    for option, value in changes.items():
        flag = "--" + option.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return tuple(args)


CASES = [
    Case("neuron-unknown-granularity", replace(NEURON, granularity="row"), "unknown --granularity 'row'"),
    Case("neuron-finetune-other-modules", replace(NEURON, finetuned="qv"),
         "is in the reference adapter but not in the fine-tuned adapter",
         save("qv", lambda d: adapter(QV_SHAPES, base=load_adapter(d / "ref").base_model))),
    Case("neuron-finetune-other-shapes", replace(NEURON, finetuned="wide"), "belong to different base models",
         save("wide", lambda d: adapter({n: (s[0] * 2, s[1]) for n, s in SHAPES.items()},
                                        base=load_adapter(d / "ref").base_model))),
    Case("neuron-finetune-other-base", NEURON, "both updates must be measured from the same weights",
         edit_config("ft", base_model_name_or_path="org/another-model")),
    Case("entry-realign-other-rank",
         ("realign", "--reference", "ref", "--finetuned", "ft", "--masks", "entry.safetensors", "--out", "out"),
         "use `nlsr realign --granularity neuron`"),
    Case("neuron-entry-masks", replace(NEURON, masks="entry.safetensors"), "were made at entry granularity"),
    Case("entry-realign-neuron-masks",
         ("realign", "--reference", "ref", "--finetuned", "ft", "--masks", "neuron.safetensors", "--out", "out"),
         "were made at neuron granularity"),
    Case("neuron-masks-of-another-reference", replace(NEURON, masks="model-masks.safetensors"),
         "were identified on another reference"),
    Case("neuron-base-for-adapters", replace(NEURON, base="m_W_a"), "--base is for model directories"),
    Case("neuron-rebase-missing", replace(NEURON, rebase="nope"), "adapter directory 'nope' does not exist"),
    Case("neuron-mixed-kinds", replace(NEURON, finetuned="m_ft"), "give both as adapters or both as model"),
    Case("neuron-models-without-base", tuple(a for a in MODELS if a not in ("--base", "m_W_a")),
         "model directories need --base DIR"),
    Case("neuron-model-without-safetensors", MODELS, "has no model.safetensors", bin_only("m_ft")),
    Case("neuron-base-without-safetensors", MODELS, "--base: model directory 'm_W_a' has no model.safetensors",
         bin_only("m_W_a")),
    Case("neuron-model-unrelated-base", replace(MODELS, base="m_other"), "does not look derived from --base"),
    Case("neuron-model-other-shapes", replace(MODELS, finetuned="m_wide"), "in the reference model but",
         other_shapes),
    Case("neuron-model-entry-masks", replace(MODELS, masks="entry.safetensors"), "the masks name"),
    Case("entry-realign-model-dirs", ("realign", "--reference", "m_ref", "--finetuned", "m_ft", "--masks",
                                      "model-masks.safetensors", "--out", "out"), "is a model directory"),
    Case("neuron-identify-model-without-safetensors",
         ("identify", "--granularity", "neuron", "--reference", "m_ref", "--base", "m_W_a", "--calibration",
          "calib.jsonl", "--out", "m.safetensors"), "has no model.safetensors", bin_only("m_ref")),
    Case("neuron-identify-model-base-not-a-model",
         ("identify", "--granularity", "neuron", "--reference", "m_ref", "--base", "ref", "--calibration",
          "calib.jsonl", "--out", "m.safetensors"), "--base: 'ref' has no config.json"),
    Case("extrapolate-model-without-weak", ("extrapolate", "--aligned", "m_W_a", "--out", "out"), "give --weak DIR"),
    Case("extrapolate-weak-for-adapter", ("extrapolate", "--aligned", "ref", "--weak", "m_W_a", "--out", "out"),
         "--weak is for model directories"),
    Case("safelora-model-without-unaligned",
         ("safelora", "--aligned", "m_W_a", "--finetuned", "m_ft", "--num-modules", "1", "--out", "out"),
         "give --unaligned DIR"),
    Case("safelora-model-with-adapter",
         ("safelora", "--aligned", "m_W_a", "--finetuned", "ft", "--unaligned", "m_W_a", "--num-modules", "1",
          "--out", "out"), "is an adapter but --aligned is a model directory"),
]


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, work, monkeypatch):
    monkeypatch.delenv("NLSR_DEBUG", raising=False)
    if case.setup:
        case.setup(work)
    before = snapshot(work)
    result = runner.invoke(app, list(case.args))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("precision ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert case.phrase in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(work) == before
