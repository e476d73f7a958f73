import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from nlsr.errors import NlsrError
from nlsr.experiment.config import ExperimentConfig, load_config
from nlsr.method import DEFAULT_Q

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.realign.variants


def test_overrides_are_applied_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nattack: {p: 0.1}\n")
    cfg = load_config(path, ["attack.p=0.2", "evaluate.judges=[refusal]", "lora.r=4"])
    assert cfg.attack.p == 0.2 and [j.name for j in cfg.evaluate.judges] == ["refusal"] and cfg.lora.r == 4


@pytest.mark.parametrize("body, message", [
    ("attack: {p: 1.5}", "attack.p"),
    ("attack: {task: imdb}", "attack.task"),
    ("align: {sft: {n: 0}}", "align.sft.n"),
    ("realign: {variants: [{name: a, select: best}]}", "unknown selection rule 'best' (known: all, paper"),
    ("realign: {variants: [{name: a}, {name: a}]}", "unique"),
    ("realign: {variants: [{name: s, method: safelora}]}", "exactly one of threshold or num_modules"),
    ("evaluate: {harmfull_n: 3}", "evaluate.harmfull_n"),
    ("- not a mapping", "mapping"),
])
def test_bad_configs_name_the_field(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    with pytest.raises(NlsrError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path)


def test_missing_config_and_bad_override(tmp_path):
    with pytest.raises(NlsrError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(NlsrError, match="section.field=value"):
        load_config(tmp_path / "c.yaml", ["attack.p"])


def test_a_base_config_is_laid_under_the_file(tmp_path):
    """``base:`` (relative to the file) gives the starting point: mappings merge, lists and values
    replace, null clears; overrides still come last."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "main.yaml").write_text(
        "name: main\nseeds: [0, 1, 2]\nattack: {task: sst2, p: 0.05, lr: 3.0e-4}\n"
        "realign:\n  sweep: {variant: nlsr, field: q, values: [0.1, 0.4]}\n")
    (tmp_path / "shared" / "side.yaml").write_text(
        "base: main.yaml\nname: side\nseeds: [0]\nattack: {task: gsm8k}\nrealign: {sweep: null}\n")
    (tmp_path / "child.yaml").write_text("base: shared/side.yaml\nattack: {p: 0.1}\n")
    cfg = load_config(tmp_path / "child.yaml", ["attack.lr=1.0e-4"])
    assert cfg.name == "side" and cfg.seeds == [0]
    assert (cfg.attack.task, cfg.attack.p, cfg.attack.lr) == ("gsm8k", 0.1, 1.0e-4)
    assert cfg.realign.sweep is None
    assert load_config(tmp_path / "shared" / "main.yaml").realign.sweep.values == [0.1, 0.4]


def test_a_missing_or_looping_base_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(NlsrError, match="base 'nowhere.yaml' does not exist"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(NlsrError, match="chain loops"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n")
    with pytest.raises(NlsrError, match="'base' must be the path"):
        load_config(tmp_path / "d.yaml")


def test_data_stage_rejects_unknown_dataset_before_training(tmp_path):
    from conftest import shared_data_dir
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages import data as data_stage

    data = shared_data_dir()
    if data is None:
        pytest.skip("no offline data folder")
    cfg = ExperimentConfig.model_validate({"align": {"sft": {"dataset": "safety_sftt", "n": 4}}})
    with pytest.raises(NlsrError, match="safety_sftt"):
        data_stage.run_align(RunContext(cfg, tmp_path, data), tmp_path, {})
    cfg = ExperimentConfig.model_validate({"align": {"sft": {"n": 5000}}})
    with pytest.raises(NlsrError, match="align.sft.n"):
        data_stage.run_align(RunContext(cfg, tmp_path, data), tmp_path, {})
    cfg = ExperimentConfig.model_validate({"evaluate": {"task_n": 10 ** 6}})
    with pytest.raises(NlsrError, match="evaluate.task_n"):
        data_stage.run_eval(RunContext(cfg, tmp_path, data), tmp_path, {})


def test_stage_graph_of_the_comparison_config():
    from nlsr.experiment.plan import build_stages

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "compare.yaml")
    stages = build_stages(cfg)
    names = [s.name for s in stages]
    for name in ("align_dpo-vaccine", "attack-vaccine", "attack-lisa", "attack-vlguard-mix",
                 "attack-constrained-sft", "evaluate-safelora-k10", "data-defences", "report"):
        assert name in names
    seen = set()
    for stage in stages:                                    # inputs always come first
        assert set(stage.inputs) <= seen, stage.name
        seen.add(stage.name)
    assert "align_dpo-vaccine" in next(s for s in stages if s.name == "attack-vaccine").inputs


def test_data_keys_ignore_learning_rates_and_alignment_ignores_the_attack(tmp_path):
    from nlsr.experiment.pipeline import stage_key
    from nlsr.experiment.plan import build_stages

    def keys(cfg):
        """Every stage's key, computed the way run_stages chains them."""
        out: dict[str, str] = {}
        for stage in build_stages(cfg):
            out[stage.name] = stage_key(stage, {i: out[i] for i in stage.inputs})
        return out

    base = keys(ExperimentConfig())
    changed = keys(ExperimentConfig.model_validate({"align": {"dpo": {"lr": 1e-3}}, "attack": {"epochs": 3}}))
    other_attack = keys(ExperimentConfig.model_validate({"attack": {"p": 0.2, "task": "ag_news"},
                                                         "evaluate": {"task_n": 100}}))
    assert base["data"] == changed["data"] and base["data-align"] == changed["data-align"]
    assert base["align_dpo"] != changed["align_dpo"]
    assert base["data"] != other_attack["data"]
    identify = f"identify-b0.9-r0.8-q{DEFAULT_Q}-identified"
    for name in ("data-align", "align_sft", "align_dpo", identify):
        assert base[name] == other_attack[name], name          # one aligned model serves every attack
    assert base["attack"] != other_attack["attack"]


def test_reserved_and_duplicate_model_names():
    with pytest.raises(ValueError, match="clashing"):
        ExperimentConfig.model_validate({"defences": [{"name": "nlsr", "method": "lisa"}]})
    with pytest.raises(ValueError, match="clashing"):
        ExperimentConfig.model_validate({"realign": {"variants": [{"name": "attacked"}]}})


def test_configs_that_reuse_the_cpu_bench_run_share_its_aligned_model():
    """The configs that reuse runs/cpu-bench (defences, p, other tasks) must have its alignment keys."""
    from nlsr.experiment import provenance
    from nlsr.experiment.pipeline import stage_key
    from nlsr.experiment.plan import build_stages

    configs = Path(__file__).resolve().parents[1] / "configs"

    def keys(name: str) -> dict[str, str]:
        cfg = load_config(configs / f"{name}.yaml", ["precision=float32", "evaluate.backend=hf"])
        out: dict[str, str] = {}
        for stage in build_stages(cfg):
            if stage.name in ("data-align", "data-refusal-pairs", "data-helpful", "align_sft", "align_dpo",
                              "data-attack-s0", "attack-s0"):
                out[stage.name] = stage_key(stage, {i: out[i] for i in stage.inputs if i in out})
        return out

    saved = provenance.code_version
    provenance.code_version = lambda: {"nlsr": "pinned", "commit": "pinned"}
    try:
        bench = keys("cpu-bench")
        for name in ("cpu-bench-defences", "cpu-bench-p", "cpu-bench-agnews", "cpu-bench-gsm8k", "cpu-bench-protect",
                     "cpu-bench-variants", "cpu-bench-fisher", "cpu-bench-factor", "method-controls"):
            other = keys(name)
            for stage in ("data-align", "data-helpful", "align_sft", "align_dpo"):
                assert other[stage] == bench[stage], f"{name}: {stage} would not reuse runs/cpu-bench"
        for name in ("cpu-bench-defences", "cpu-bench-protect", "cpu-bench-variants", "cpu-bench-factor"):
            assert keys(name)["attack-s0"] == bench["attack-s0"]
        assert keys("cpu-bench-p")["data-attack-s0"] != bench["data-attack-s0"]      # another p
        assert keys("cpu-bench-agnews")["data-attack-s0"] != bench["data-attack-s0"]  # another task
    finally:
        provenance.code_version = saved


def _leaves(model: type[BaseModel]) -> list[str]:
    """The leaf fields of a config model, nested sections (and sections listed) entered."""
    out = []
    for name, info in model.model_fields.items():
        inner = [t for t in (info.annotation, *typing.get_args(info.annotation))
                 for t in (t, *typing.get_args(t)) if isinstance(t, type) and issubclass(t, BaseModel)]
        out += [f"{name}.{leaf}" for leaf in _leaves(inner[0])] if inner else [name]
    return out


def test_the_config_has_128_leaf_fields():
    """The count after the curves at equal FA cost of issue 34 (126 before them, 115 before the controls,
    136 before the recipe search): a field added or removed updates this number on purpose."""
    leaves = _leaves(ExperimentConfig)
    assert len(leaves) == len(set(leaves)) == 128
    assert "align.helpful.dpo_pairs" in leaves and "evaluate.judges.label" in leaves
    assert not [leaf for leaf in leaves if leaf.startswith(("align.overrefusal", "align.contrast"))]


@pytest.mark.parametrize("text, phrase", [
    ("", "sets nothing"),
    ("# only a comment\n", "sets nothing"),
    ("model: ./no/such/model\n", "model path './no/such/model' does not exist"),
    ("device: cuda:7\n", "is not on this machine (devices present: cpu"),
    ("colour: blue\n", "colour"),
])
def test_config_errors_before_any_work(tmp_path, text, phrase):
    import torch

    if "cuda" in text and torch.cuda.device_count() > 7:
        pytest.skip("a machine with eight GPUs has cuda:7")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(NlsrError, match=phrase.replace("(", r"\(").replace(".", r"\.")):
        load_config(tmp_path / "c.yaml")


def test_validate_and_run_refuse_a_missing_model_and_write_nothing(tmp_path):
    from typer.testing import CliRunner

    from nlsr.cli import app

    (tmp_path / "c.yaml").write_text(f"model: {tmp_path / 'nope'}\nruns_dir: {tmp_path / 'runs'}\n")
    for command in ("validate", "run"):
        r = CliRunner().invoke(app, [command, str(tmp_path / "c.yaml")])
        assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
