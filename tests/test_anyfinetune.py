"""The threat models of ``attack.init`` in the pipeline: stage graphs, refusals, and the fresh-LoRA and
full fine-tune paths end to end on the tiny model (train, identify, repair, evaluate); and the stage
keys of the shipped configs: stable, and changed exactly downstream of a changed field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIBRATION_ROWS, REPO_ROOT, TARGETS, random_adapter, write_jsonl
from nlsr.errors import NlsrError
from nlsr.experiment.config import ExperimentConfig, load_config
from nlsr.method import DEFAULT_Q

KEYED_CONFIGS = ("smoke", "cpu-bench", "compare", "paper")
NEURON = f"identify-b0.9-r0.8-q{DEFAULT_Q}-identified-neuron"      # variants that name no q
ENTRY = f"identify-b0.9-r0.8-q{DEFAULT_Q}-identified"


def _keys(cfg: ExperimentConfig) -> dict[str, str]:
    """Every stage's key as run_stages chains them, the code version fixed."""
    from nlsr.experiment import provenance
    from nlsr.experiment.pipeline import stage_key
    from nlsr.experiment.plan import build_stages

    saved = provenance.code_version
    provenance.code_version = lambda: {"nlsr": "pinned", "commit": "pinned"}
    try:
        out: dict[str, str] = {}
        for stage in build_stages(cfg):
            out[stage.name] = stage_key(stage, {i: out[i] for i in stage.inputs})
        return out
    finally:
        provenance.code_version = saved


def _config(name: str, *overrides: str) -> ExperimentConfig:
    # explicit precision and backend: "auto" resolves differently on other machines
    return load_config(REPO_ROOT / "configs" / f"{name}.yaml", ["precision=float32", "evaluate.backend=hf", *overrides])


def _downstream(cfg: ExperimentConfig, names: set[str]) -> set[str]:
    """``names`` and every stage that reads one of them, directly or not."""
    from nlsr.experiment.plan import build_stages

    out = set(names)
    for stage in build_stages(cfg):          # in dependency order: inputs come first
        if out & set(stage.inputs):
            out.add(stage.name)
    return out


def _params(cfg: ExperimentConfig) -> dict[str, dict]:
    from nlsr.experiment.plan import build_stages

    return {s.name: s.params for s in build_stages(cfg)}


@pytest.mark.parametrize("name", KEYED_CONFIGS)
def test_shipped_configs_give_the_same_keys_twice(name):
    assert _keys(_config(name)) == _keys(_config(name))


EVALUATIONS = "evaluate-"
ATTACKS = ("attack-s", "attack-p0-s", "attack_nonaligned-s")


@pytest.mark.parametrize(("override", "direct"), [
    ("name=elsewhere", lambda n: False),                       # names the folder, not a result
    ("runs_dir=/tmp/other", lambda n: False),
    ("align.dpo.beta=0.2", lambda n: n == "align_dpo"),
    ("align.helpful.dpo_pairs=100", lambda n: n == "align_dpo"),   # the helpful answers stay
    ("align.sft.lr=1.0e-4", lambda n: n == "align_sft"),
    ("attack.lr=1.0e-4", lambda n: n.startswith(ATTACKS)),
    ("attack.init=continue", lambda n: False),                 # the default, written out
    ("lora.dropout=0.1", lambda n: n in ("align_sft", "align_dpo") or n.startswith(ATTACKS)),
    ("evaluate.xstest_max_new_tokens=16", lambda n: n.startswith(EVALUATIONS)),
    ("evaluate.xstest_validation_n=50", lambda n: n == "data" or n.startswith(EVALUATIONS)),
    ("evaluate.judges=[refusal]", lambda n: n == "report"),
    ("realign.calibration_n=200", lambda n: n == "data-align" or n.startswith("identify-")),
])
def test_a_changed_field_changes_exactly_the_stages_downstream_of_it(override, direct):
    """cpu-bench with one field changed: the stages whose own parameters change are the expected
    ones, and the keys that change are exactly those stages and everything downstream of them."""
    base, changed = _config("cpu-bench"), _config("cpu-bench", override)
    before, after = _params(base), _params(changed)
    assert list(before) == list(after)
    moved = {n for n in before if before[n] != after[n]}
    assert moved == {n for n in before if direct(n)}
    old, new = _keys(base), _keys(changed)
    assert {n for n in old if old[n] != new[n]} == _downstream(base, moved)
    assert moved or old == new


def _stages(**sections) -> dict:
    from nlsr.experiment.plan import build_stages

    return {s.name: s for s in build_stages(ExperimentConfig.model_validate(sections))}


NEURON_VARIANTS = [{"name": "nlsr-neuron", "granularity": "neuron"},
                   {"name": "safelora", "method": "safelora", "threshold": 0.6}]


def test_continue_runs_entry_and_neuron_head_to_head():
    stages = _stages(seeds=[0, 1], realign={"variants": [{"name": "nlsr"}, *NEURON_VARIANTS]})
    assert "align_merged" not in stages and ENTRY in stages and NEURON in stages
    assert stages[NEURON].inputs == ["data-align", "align_sft", "align_dpo"]
    assert stages[NEURON].params["reference"] == "adapter"
    neuron = stages["realign-nlsr-neuron-s1"]
    assert neuron.inputs == ["align_sft", "align_dpo", "attack-s1", NEURON]
    assert neuron.params["variant"]["granularity"] == "neuron"
    assert stages["realign-nlsr-s1"].params["variant"]["granularity"] == "entry"
    assert stages["evaluate-nlsr-neuron-s1"].inputs == ["data", "align_sft", "realign-nlsr-neuron-s1"]
    models = {m["label"]: m for m in stages["report"].params["models"]}
    assert models["nlsr-neuron"]["cost"][0] == [NEURON, "realign-nlsr-neuron-s0"]


def test_fresh_trains_a_fresh_lora_on_the_merged_aligned_model():
    stages = _stages(seeds=[0, 1], attack={"init": "fresh", "fresh_r": 8, "benign_control": True},
                     realign={"variants": NEURON_VARIANTS})
    continue_stages = _stages(seeds=[0, 1], attack={"benign_control": True}, realign={"variants": NEURON_VARIANTS})
    assert stages["align_merged"].inputs == ["align_sft", "align_dpo"] and ENTRY not in stages
    assert stages[NEURON].params["reference"] == "adapter"
    for seed in (0, 1):
        attack = stages[f"attack-s{seed}"]
        assert attack.inputs == [f"data-attack-s{seed}", "align_merged"]
        assert attack.params["attack"]["init"] == "fresh" and attack.params["attack"]["fresh_r"] == 8
        assert attack.params["lora"]["alpha"] == 32                              # lora.alpha by default
        assert stages[f"attack-p0-s{seed}"].inputs == attack.inputs
        assert stages[f"evaluate-attacked-s{seed}"].inputs == ["data", "align_merged", f"attack-s{seed}"]
        realigned = stages[f"realign-nlsr-neuron-s{seed}"]
        assert realigned.inputs == ["align_sft", "align_dpo", f"attack-s{seed}", "align_merged", NEURON]
        assert stages[f"realign-safelora-s{seed}"].run.__qualname__.startswith("run_variant")  # adapter form
        assert stages[f"evaluate-safelora-s{seed}"].inputs == ["data", "align_merged", f"realign-safelora-s{seed}"]
    # what the threat model does not change keeps its key: copied across runs by reuse_from
    fresh, cont = (_keys_of(s) for s in (stages, continue_stages))
    for name in ("data", "align_sft", "align_dpo", NEURON, "evaluate-aligned", "data-attack-s0"):
        assert fresh[name] == cont[name], name
    assert fresh["attack-s0"] != cont["attack-s0"]


def _keys_of(stages: dict) -> dict[str, str]:
    from nlsr.experiment.pipeline import stage_key

    out: dict[str, str] = {}
    for stage in stages.values():
        out[stage.name] = stage_key(stage, {i: out[i] for i in stage.inputs})
    return out


def test_full_fine_tunes_every_weight_and_repairs_model_directories():
    stages = _stages(attack={"init": "full", "full_lr": 2e-5}, realign={"variants": NEURON_VARIANTS})
    assert stages["attack"].params["attack"]["full_lr"] == 2e-5
    assert stages["attack"].inputs == ["data-attack", "align_merged"]
    assert stages[NEURON].inputs == ["data-align", "align_sft", "align_merged"]
    assert stages[NEURON].params["reference"] == "model"
    assert stages["evaluate-attacked"].inputs == ["data", "attack"]
    for name in ("realign-nlsr-neuron", "realign-safelora"):
        assert stages[name].run.__qualname__.startswith("run_realign")
        assert stages[f"evaluate-{name.removeprefix('realign-')}"].inputs == ["data", name]


@pytest.mark.parametrize("overrides, message", [
    (["attack.init=fresh"], "granularity entry"),
    (["attack.init=full"], "set 'granularity: neuron'"),
    (["attack.init=fresh", "realign.variants=[{name: n, granularity: neuron}]",
      "defences=[{name: lisa, method: lisa}]"], "defences"),
    (["attack.init=full", "num_processes=2", "realign.variants=[{name: n, granularity: neuron}]"],
     "num_processes: 1"),
    (["realign.variants=[{name: s, method: safelora, threshold: 0.5, granularity: neuron}]"],
     "granularity is an NLSR setting"),
    (["realign.variants=[{name: n, granularity: neuron, masks: random}]"], "random masks"),
    (["attack.init=partial"], "attack.init"),
])
def test_bad_threat_model_configs_are_refused_on_load(overrides, message):
    with pytest.raises(NlsrError, match=message) as err:
        load_config(REPO_ROOT / "configs" / "anyfinetune.yaml", overrides)
    assert "\n" not in str(err.value)


def test_anyfinetune_configs_differ_only_in_the_threat_model():
    from nlsr.experiment.plan import build_stages

    configs = {init: load_config(REPO_ROOT / "configs" / f"anyfinetune{suffix}.yaml")
               for init, suffix in (("continue", ""), ("fresh", "-fresh"), ("full", "-full"))}
    first = configs["continue"].model_dump()
    for init, cfg in configs.items():
        assert cfg.attack.init == init and cfg.seeds == [0, 1, 2]
        dump = cfg.model_dump()
        variants = [v["name"] for v in dump["realign"].pop("variants")]
        assert variants == (["nlsr", "nlsr-neuron", "safelora"] if init == "continue" else ["nlsr-neuron", "safelora"])
        for section in (dump, first):
            for key in ("name", "reuse_from"):
                section.pop(key, None)
        dump["attack"].pop("init")
        assert dump == {**first, "attack": {k: v for k, v in first["attack"].items() if k != "init"},
                        "realign": {k: v for k, v in first["realign"].items() if k != "variants"}}
        names = {s.name for s in build_stages(cfg)}
        assert {"realign-nlsr-neuron-s2", "evaluate-safelora-s0", "report"} <= names
    assert configs["fresh"].reuse_from == ["runs/anyfinetune"]
    assert configs["full"].reuse_from == ["runs/anyfinetune", "runs/anyfinetune-fresh"]


# ---- end to end on the tiny model ---------------------------------------------------------------

def _small(adapter, factor: float = 0.02):
    """The adapter with B scaled down: an alignment update of about 1% of the tiny model's weights."""
    from nlsr.weights.adapters import LoraFactors

    return adapter.with_modules({n: LoraFactors(f.A, f.B * factor, f.scale) for n, f in adapter})


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir, shapes):
    """Finished ``align_sft`` (W_0 = the tiny model), ``align_dpo``, ``data-align``, ``data-attack`` and
    ``data`` stages, and a config factory for the tiny model."""
    from nlsr.weights.adapters import save_adapter

    for name in ("align_sft", "align_dpo", "data-align", "data-attack", "data"):
        (tmp_path / name).mkdir()
    (tmp_path / "align_sft" / "model").symlink_to(tiny_model_dir)
    save_adapter(_small(random_adapter(shapes, base=str(tmp_path / "align_sft" / "model"))),
                 tmp_path / "align_dpo" / "adapter")
    write_jsonl(tmp_path / "data-align" / "calibration.jsonl", CALIBRATION_ROWS)
    write_jsonl(tmp_path / "data-attack" / "attack.jsonl",
                [{"instruction": f"Is this positive? {i}", "input": "", "output": "positive" if i % 2 else "negative",
                  "flag": "safe"} for i in range(4)])
    write_jsonl(tmp_path / "data" / "harmful_eval.jsonl", [{"prompt": p["prompt"]} for p in CALIBRATION_ROWS[:2]])
    write_jsonl(tmp_path / "data" / "task_eval.jsonl",
                [{"instruction": "Sentiment?", "input": "great film", "label": "positive"}])
    write_jsonl(tmp_path / "data" / "xstest_safe.jsonl", [])

    def config(init: str, variants: list[dict]) -> ExperimentConfig:
        return ExperimentConfig.model_validate({
            "model": str(tiny_model_dir), "template": "chat", "precision": "float32", "device": "cpu",
            "lora": {"r": 2, "alpha": 4, "targets": list(TARGETS)},
            "attack": {"init": init, "fresh_r": 3, "fresh_alpha": 6, "full_lr": 1e-3, "epochs": 1, "lr": 1e-2,
                       "batch_size": 4, "max_length": 64},
            "realign": {"batch_size": 4, "max_length": 64, "variants": variants},
            "evaluate": {"harmful_max_new_tokens": 3, "xstest_n": 0, "batch_size": 4, "backend": "hf"}})
    return tmp_path, config


def _run(stage, ctx, root: Path, name: str, inputs: list[str], roles: dict[str, str] | None = None) -> dict:
    """Run one stage function as run_stages does: into ``<name>.partial``, then renamed."""
    partial = root / f"{name}.partial"
    partial.mkdir()
    summary = stage(ctx, partial, {(roles or {}).get(i, i): root / i for i in inputs})
    partial.rename(root / name)
    return summary


def test_fresh_lora_path_end_to_end(tiny_run):
    from nlsr.experiment.config import VariantSection
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages import anyfinetune, evaluate, realign
    from nlsr.method.masks import load_masks
    from nlsr.training.trainers import merge_adapter
    from nlsr.weights.adapters import load_adapter
    from nlsr.weights.models import load_model

    root, config = tiny_run
    neuron = {"name": "nlsr-neuron", "granularity": "neuron", "select": "threshold", "threshold": 2.0}
    cfg = config("fresh", [neuron, {"name": "safelora", "method": "safelora", "threshold": 2.0, "direction": "dpo"}])
    ctx = RunContext(cfg, root / "run", root)
    _run(anyfinetune.run_merge_aligned, ctx, root, "align_merged", ["align_sft", "align_dpo"])
    attack = anyfinetune.run_attack_init("fresh")
    summary = _run(attack, ctx, root, "attack", ["data-attack", "align_merged"])
    assert summary["steps"] == 1 and summary["line"].startswith("fresh LoRA r=3")
    fresh = load_adapter(root / "attack" / "adapter")
    assert {f.rank for _, f in fresh} == {3}
    assert Path(fresh.base_model).resolve() == (root / "align_merged" / "model").resolve()
    variant = VariantSection(**neuron)
    _run(anyfinetune.run_identify_neuron(variant, "adapter"), ctx, root, NEURON,
         ["data-align", "align_sft", "align_dpo"])
    masks = load_masks(root / NEURON / "masks.safetensors")
    assert masks.metadata["granularity"] == "neuron"
    result = _run(anyfinetune.run_realign(variant, "fresh"), ctx, root, "realign-nlsr-neuron",
                  ["align_sft", "align_dpo", "attack", "align_merged", NEURON])
    assert result["summary"]["repaired"] == result["summary"]["modules"] == len(fresh)   # threshold 2: all
    repaired = load_adapter(root / "realign-nlsr-neuron" / "adapter")
    aligned = load_adapter(root / "align_dpo" / "adapter")
    assert {f.rank for _, f in repaired} == {4 + 3}          # the reference β ΔW_a (rank 4) + the fresh LoRA
    # every row of the repaired model is W_a + β ΔW_a (= W_0 + (1+β) ΔW_a) where masked, W_a + ΔW_ft elsewhere
    w = dict(merge_adapter(load_model(str(root / "align_merged" / "model"), precision="float32"),
                           root / "realign-nlsr-neuron" / "adapter").named_parameters())
    w0 = dict(load_model(str(root / "align_sft" / "model"), precision="float32").named_parameters())
    for name, f in fresh:
        m = masks.masks[f"{name}.weight"]
        d_a, d_ft = aligned.modules[name].delta().float(), f.delta().float()
        expected = torch.where(m[:, None], w0[f"{name}.weight"] + 1.9 * d_a, w0[f"{name}.weight"] + d_a + d_ft)
        torch.testing.assert_close(w[f"{name}.weight"], expected, atol=2e-5, rtol=1e-4)
    _run(realign.run_variant(VariantSection(name="safelora", method="safelora", threshold=2.0, direction="dpo")),
         ctx, root, "realign-safelora", ["align_sft", "align_dpo", "attack"])
    for stage in ("attack", "realign-nlsr-neuron", "realign-safelora"):
        metrics = _run(evaluate.run_model("merged", stage), ctx, root, f"evaluate-{stage}",
                       ["data", "align_merged", stage])["metrics"]
        assert metrics["n"]["harmful"] == 2 and metrics["n"]["task"] == 1


def test_full_fine_tune_path_end_to_end(tiny_run):
    from nlsr.experiment.config import VariantSection
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages import anyfinetune, evaluate
    from nlsr.method.masks import load_masks
    from nlsr.weights.model_dirs import ModelDir

    root, config = tiny_run
    neuron = {"name": "nlsr-neuron", "granularity": "neuron", "select": "threshold", "threshold": 2.0}
    safelora = {"name": "safelora", "method": "safelora", "threshold": 2.0}
    cfg = config("full", [neuron, safelora])
    ctx = RunContext(cfg, root / "run", root)
    _run(anyfinetune.run_merge_aligned, ctx, root, "align_merged", ["align_sft", "align_dpo"])
    summary = _run(anyfinetune.run_attack_init("full"), ctx, root, "attack", ["data-attack", "align_merged"])
    assert summary["steps"] == 1 and "full fine-tune, lr 0.001" in summary["line"]
    ft, merged = ModelDir(root / "attack" / "model"), ModelDir(root / "align_merged" / "model")
    embed = "model.embed_tokens.weight"
    assert not torch.equal(ft.tensor(embed), merged.tensor(embed))          # every weight trained
    variant = VariantSection(**neuron)
    _run(anyfinetune.run_identify_neuron(variant, "model"), ctx, root, NEURON,
         ["data-align", "align_sft", "align_merged"])
    masks = load_masks(root / NEURON / "masks.safetensors")
    assert masks.metadata["reference_kind"] == "model" and len(masks.masks) == 4 * 2   # 4 targets x 2 layers
    reference = ModelDir(root / NEURON / "reference")
    result = _run(anyfinetune.run_realign(variant, "full"), ctx, root, "realign-nlsr-neuron",
                  ["align_sft", "align_dpo", "attack", "align_merged", NEURON])
    assert result["summary"]["repaired"] == len(masks.masks)
    out = ModelDir(root / "realign-nlsr-neuron" / "model")
    for key, m in masks.masks.items():                 # masked rows from W_e, the rest the fine-tune's
        torch.testing.assert_close(out.tensor(key)[m], reference.tensor(key)[m], atol=0, rtol=0)
        torch.testing.assert_close(out.tensor(key)[~m], ft.tensor(key)[~m], atol=0, rtol=0)
    assert torch.equal(out.tensor(embed), ft.tensor(embed))
    projected = _run(anyfinetune.run_realign(VariantSection(**safelora), "full"), ctx, root, "realign-safelora",
                     ["align_sft", "align_dpo", "attack", "align_merged"])
    assert projected["summary"]["projected"] > 0
    for stage in ("attack", "realign-nlsr-neuron", "realign-safelora"):
        metrics = _run(evaluate.run_model("model", stage), ctx, root, f"evaluate-{stage}", ["data", stage])["metrics"]
        assert metrics["n"]["harmful"] == 2


def test_a_full_run_reuses_the_continue_run_and_runs_through(tmp_path, tiny_model_dir, root):
    """The stage graph of ``init: full`` end to end through ``run_experiment`` on the tiny model, copying
    the data, the alignment and the aligned model's evaluation from an ``init: continue`` run."""
    from nlsr.experiment.plan import run_experiment

    train = {"epochs": 1, "batch_size": 4, "max_length": 384}
    common = {"runs_dir": str(tmp_path / "runs"), "model": str(tiny_model_dir), "template": "chat",
              "precision": "float32", "device": "cpu",
              "lora": {"r": 2, "alpha": 4, "targets": list(TARGETS)},
              "align": {"sft": {**train, "n": 8}, "dpo": {**train, "n": 4}},
              "realign": {"batch_size": 4, "max_length": 64, "calibration_n": 8,
                          "variants": [{"name": "nlsr-neuron", "granularity": "neuron"},
                                       {"name": "safelora", "method": "safelora", "threshold": 0.6}]},
              "evaluate": {"harmful_n": 4, "harmful_max_new_tokens": 2, "task_n": 2, "xstest_n": 0,
                           "backend": "hf", "judges": ["refusal"]}}
    attack = {**train, "n": 8, "nonaligned_control": False}
    lines: list[str] = []
    run_experiment(ExperimentConfig.model_validate({**common, "name": "cont", "attack": attack}), data=root,
                   log=lines.append, until="evaluate-aligned")
    full = ExperimentConfig.model_validate({**common, "name": "full", "reuse_from": [str(tmp_path / "runs" / "cont")],
                                            "attack": {**attack, "init": "full", "full_lr": 1e-4}})
    lines.clear()
    run_dir = run_experiment(full, data=root, log=lines.append)
    reused = {line.split()[1].rstrip(":") for line in lines if line.startswith("[reuse]")}
    assert reused == {"data", "data-align", "align_sft", "align_dpo", "evaluate-aligned"}
    for stage in ("align_merged", "attack", NEURON, "realign-nlsr-neuron", "realign-safelora"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert (run_dir / "realign-nlsr-neuron" / "model" / "model.safetensors").is_file()
    report = (run_dir / "report" / "report.md").read_text()
    assert "nlsr-neuron" in report and "safelora" in report
