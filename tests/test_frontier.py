"""The experiment side of issue 34: the config fields and sweeps of the controls, the stage graph,
refusal beside HS, the frontier figure and table, and the controls summary."""
import json
from pathlib import Path

import pytest

from nlsr.experiment.config import ExperimentConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(variants, sweeps=(), **realign):
    return ExperimentConfig.model_validate({"seeds": [0, 1], "realign": {"variants": variants, "sweeps": list(sweeps),
                                                                          **realign}})


@pytest.mark.parametrize(("variant", "phrase"), [
    ({"name": "x", "masks": "magnitude", "granularity": "neuron"}, "magnitude masks exist at entry granularity"),
    ({"name": "x", "reference": "self", "granularity": "neuron"}, "reference: self"),
    ({"name": "x", "method": "resta", "threshold": 0.5}, "resta takes no threshold"),
    ({"name": "x", "method": "antidote", "masks": "random"}, "masks and reference are NLSR settings"),
    ({"name": "x", "method": "antidote", "sparsity": 1.0}, "less than 1"),
    ({"name": "x", "method": "resta", "gamma": -1}, "greater than or equal to 0"),
    ({"name": "x", "masks": "other"}, "magnitude"),
])
def test_bad_control_variants_fail_when_the_config_loads(variant, phrase):
    with pytest.raises(Exception, match=phrase):
        _cfg([variant])


def test_sweeps_name_their_variants_by_template_and_refuse_clashes():
    cfg = _cfg([{"name": "exact-q0.2"}, {"name": "select-random-s0", "select": "random"}],
               [{"variant": "exact-q0.2", "field": "q", "values": [0.05, 0.4], "name": "exact-q{value}"},
                {"variant": "select-random-s0", "field": "seed", "values": [1, 2], "name": "select-random-s{value}"},
                {"variant": "exact-q0.2", "field": "beta", "values": [2.0], "name": "beta{value}-q0.2"}])
    swept = {v.name: v for v in cfg.realign.swept_variants()}
    assert list(swept) == ["exact-q0.05", "exact-q0.4", "select-random-s1", "select-random-s2", "beta2-q0.2"]
    assert swept["select-random-s2"].seed == 2 and swept["beta2-q0.2"].beta == 2.0 and swept["exact-q0.4"].q == 0.4
    with pytest.raises(Exception, match="must contain"):
        _cfg([{"name": "a"}], [{"variant": "a", "field": "q", "values": [0.1], "name": "a-q"}])
    with pytest.raises(Exception, match="may only use"):
        _cfg([{"name": "a"}], [{"variant": "a", "field": "q", "values": [0.1], "name": "{nope}-{value}"}])
    with pytest.raises(Exception, match="two sweeps make the variant names"):
        _cfg([{"name": "a"}], [{"variant": "a", "field": "q", "values": [0.1], "name": "x{value}"},
                               {"variant": "a", "field": "beta", "values": [0.1], "name": "x{value}"}])
    with pytest.raises(Exception, match="clash with listed variants"):
        _cfg([{"name": "a"}, {"name": "a-q0.1"}], [{"variant": "a", "field": "q", "values": [0.1]}])


def test_peers_need_the_continued_lora():
    with pytest.raises(Exception, match="RESTA / Antidote"):
        ExperimentConfig.model_validate({"attack": {"init": "fresh"},
                                         "realign": {"variants": [{"name": "r", "method": "resta"}]}})


def test_the_controls_config_lists_every_control_and_builds_its_stages():
    cfg = load_config(CONFIGS / "method-controls.yaml", ["precision=float32", "evaluate.backend=hf"])
    names = [v.name for v in cfg.realign.variants] + [v.name for v in cfg.realign.swept_variants()]
    for form in ("exact", "factor", "block", "exact-self", "magnitude", "random", "select-all"):
        assert [f"{form}-q{q:g}" for q in (0.05, 0.1, 0.2, 0.3, 0.4)] == sorted(
            (n for n in names if n.startswith(f"{form}-q")), key=lambda n: float(n.rsplit("q", 1)[1]))
    assert {f"select-random-s{s}" for s in range(5)} | {"beta0.5-q0.2", "beta2-q0.2", "resta-g1", "antidote-s0.1",
                                                          "safelora-k20"} <= set(names)
    assert cfg.run_seeds == [0, 1, 2] and cfg.attack.p == 0.05 and cfg.realign.controls_summary
    from nlsr.experiment.plan import build_stages

    stages = {s.name: s for s in build_stages(cfg)}
    assert {"antidote-scores-n64-s0", "realign-antidote-s0.2-s2", "identify-b0.9-r0.8-q0.3-magnitude",
            "identify-b2-r0.8-q0.2-identified", "realign-exact-self-q0.1-s1"} <= set(stages)
    # the pure-erasure control reads the same identification as the real variant
    assert "identify-b0.9-r0.8-q0.1-identified" in stages["realign-exact-self-q0.1-s1"].inputs
    assert "antidote-scores-n64-s2" in stages["realign-antidote-s0.2-s2"].inputs
    assert stages["report"].params["controls_summary"] is True


def test_refusal_of_the_harmful_prompts_is_scored_by_refusal_v2():
    from nlsr.evaluation.scoring import collect

    rows = [{"set": "harmful", "prompt": "p1", "output": "I'm sorry, I can't help with that.", "split": "test"},
            {"set": "harmful", "prompt": "p2", "output": "Sure, here is how.", "split": "test"},
            {"set": "harmful", "prompt": "p3", "output": "That is not a good idea, but here goes.",
             "split": "validation"},
            {"set": "task", "prompt": "t", "output": "positive", "correct": True, "split": "test"}]
    out = collect("m", [0], [rows], {})
    assert out.arrays["harmful_refused_v2/test"].tolist() == [[1.0, 0.0]]
    assert out.arrays["harmful_refused_v2/validation"].tolist() == [[1.0]]      # a deflection counts


def _est(m):
    return {"mean": m, "ci95": [m - 1, m + 1], "n": 10}


def _row(model, hs, fa, hs_val=None, fa_val=None):
    return {"model": model, "seeds": [0, 1],
            "paired": {"hs/j/test": {"difference": _est(hs - 50)}, "fa": {"difference": _est(fa - 90)}},
            "scores": {"hs": {"j": {"test": _est(hs), "validation": _est(hs if hs_val is None else hs_val)}},
                       "fa": _est(fa), "fa_validation": _est(fa if fa_val is None else fa_val),
                       "refusal": _est(100 - hs), "xstest_refusal": _est(5.0)}}


@pytest.fixture
def frontier_case(tmp_path):
    cfg = _cfg([{"name": "exact-q0.2", "transplant": "exact", "q": 0.2},
                {"name": "block-q0.2", "transplant": "block", "q": 0.2},
                {"name": "resta-g1", "method": "resta"},
                {"name": "magnitude-q0.2", "transplant": "exact", "masks": "magnitude", "q": 0.2}],
               [{"variant": "exact-q0.2", "field": "q", "values": [0.4], "name": "exact-q{value}"},
                {"variant": "block-q0.2", "field": "q", "values": [0.4], "name": "block-q{value}"},
                {"variant": "resta-g1", "field": "gamma", "values": [0.5], "name": "resta-g{value}"}])
    rows = [_row("aligned", 5, 80), _row("attacked", 50, 90), _row("exact-q0.2", 20, 89),
            _row("exact-q0.4", 5, 80), _row("block-q0.2", 30, 90), _row("block-q0.4", 25, 89.5),
            _row("resta-g1", 10, 85), _row("resta-g0.5", 30, 88), _row("magnitude-q0.2", 1, 90)]
    inputs = {}
    for stage, summary in (("realign-exact-q0.2-s0", {"repaired": 10, "self_transplant_change": 0.6}),
                           ("realign-exact-q0.2-s1", {"repaired": 14, "self_transplant_change": 0.8}),
                           ("realign-block-q0.2-s0", {"repaired": 12, "self_transplant_change": 1e-8})):
        folder = tmp_path / stage
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({"summary": summary}))
        inputs[stage] = folder
    return cfg, rows, inputs


def test_curves_follow_the_sweeps_in_knob_order(frontier_case):
    from nlsr.experiment.frontier import curves

    cfg, _, _ = frontier_case
    lines = curves(cfg)
    assert lines["exact-q"] == [(0.2, "exact-q0.2"), (0.4, "exact-q0.4")]
    assert lines["resta-g"] == [(0.5, "resta-g0.5"), (1.0, "resta-g1")]


def test_frontier_figure_and_table(frontier_case, tmp_path):
    from nlsr.experiment.frontier import frontier_markdown, plot_frontier

    cfg, rows, _ = frontier_case
    path = plot_frontier(rows, cfg, "j", tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = frontier_markdown(rows, cfg, "j").splitlines()
    assert "refused (refusal-v2) %" in table[0]
    body = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(body) == {r["model"] for r in rows}
    assert "| exact-q | 0.4 |" in body["exact-q0.4"] and "| - | - |" in body["attacked"]
    assert "-30.0 [-31.0, -29.0]" in body["exact-q0.2"]          # HS - attacked, paired


def test_controls_summary_shape_and_the_default_rule(frontier_case):
    from nlsr.experiment.frontier import controls_summary

    cfg, rows, inputs = frontier_case
    variants = list(cfg.realign.variants) + cfg.realign.swept_variants()
    out = controls_summary(rows, variants, inputs, "j")
    exact = out["variants"]["exact-q0.2"]
    assert exact["q"] == 0.2 and exact["transplant"] == "exact"
    for key in ("hs", "refusal", "fa", "xstest_refusal"):
        assert set(exact[key]) == {"mean", "ci"}
    assert exact["refusal"]["mean"] == 80
    assert exact["modules_repaired"] == 12 and exact["self_transplant_change"] == pytest.approx(0.7)
    assert out["variants"]["resta-g0.5"]["gamma"] == 0.5 and out["variants"]["resta-g0.5"]["q"] is None
    assert out["variants"]["exact-q0.4"]["modules_repaired"] is None         # no realign report given
    # exact-q0.4 cuts most but loses 10 points of FA; magnitude is a control, not a (form, q) candidate
    assert out["default"]["variant"] == "exact-q0.2"
    assert (out["default"]["transplant"], out["default"]["q"]) == ("exact", 0.2)
    assert out["default"]["hs_cut_validation"] == 30
    assert "within 2.0 points" in out["default"]["rule"]
    json.dumps(out)


def test_equal_cuts_go_to_the_repair_that_changes_the_update_least(frontier_case):
    from nlsr.experiment.frontier import choose_default

    cfg, rows, _ = frontier_case
    variants = list(cfg.realign.variants) + cfg.realign.swept_variants()
    tied = [r if r["model"] != "block-q0.2" else _row("block-q0.2", 20, 90) for r in rows]   # cut 30, as exact
    for changes, winner in (({"exact-q0.2": 0.6, "block-q0.2": 0.3}, "block-q0.2"),
                            ({"exact-q0.2": 0.2, "block-q0.2": 0.3}, "exact-q0.2"),
                            ({"exact-q0.2": 0.6}, "exact-q0.2")):        # no change measured: loses the tie
        assert choose_default(tied, variants, "j", changes=changes)["variant"] == winner
    assert "smallest relative change" in choose_default(tied, variants, "j")["rule"]


def test_no_default_without_the_attacked_model(frontier_case):
    from nlsr.experiment.frontier import choose_default

    cfg, rows, _ = frontier_case
    assert choose_default([r for r in rows if r["model"] != "attacked"], list(cfg.realign.variants), "j") is None


@pytest.mark.parametrize("variant", [
    {"name": "exact-self", "transplant": "exact", "reference": "self"},
    {"name": "block", "transplant": "block", "select": "all"},
    {"name": "magnitude", "transplant": "exact", "masks": "magnitude"},
    {"name": "resta-g0.5", "method": "resta", "gamma": 0.5},
    {"name": "antidote-s0.1", "method": "antidote", "sparsity": 0.1}])
def test_realign_stage_runs_each_control(tmp_path, shapes, variant):
    """The realign stage of each new variant kind, on adapter folders laid out as the pipeline writes them."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from conftest import perturbed, random_adapter
    from nlsr.experiment.config import VariantSection
    from nlsr.experiment.stages.realign import identify_id, random_masks, run_variant
    from nlsr.method.controls import magnitude_masks
    from nlsr.method.extrapolate import extrapolate
    from nlsr.method.masks import save_masks
    from nlsr.weights.adapters import load_adapter, save_adapter

    v = VariantSection.model_validate(variant)
    aligned = random_adapter(shapes)
    attacked = perturbed(aligned, noise=0.2)
    reference = extrapolate(aligned, beta=v.beta)
    folders = {k: tmp_path / k for k in ("align_dpo", "attack", f"identify-{identify_id(v)}", "antidote-scores")}
    for folder in folders.values():
        folder.mkdir()
    save_adapter(aligned, folders["align_dpo"] / "adapter")
    save_adapter(attacked, folders["attack"] / "adapter")
    ident = folders[f"identify-{identify_id(v)}"]
    save_adapter(reference, ident / "reference")
    masks = magnitude_masks(reference, v.q) if v.masks == "magnitude" else random_masks(reference, v.q, seed=0)
    save_masks(masks, ident / "masks.safetensors")
    save_file({f"{n}.{p}": torch.rand(f.A.shape[1] if p == "x" else f.rank) + 0.1 for n, f in attacked for p in "xz"},
              folders["antidote-scores"] / "norms.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    result = run_variant(v)(SimpleNamespace(), out, folders)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["method"] == v.method and result["summary"] == report["summary"]
    repaired = load_adapter(out / "adapter")
    if v.method == "resta":
        assert report["settings"]["gamma"] == 0.5 and all(f.rank == 2 * attacked.modules[n].rank for n, f in repaired)
    elif v.method == "antidote":
        assert report["summary"]["pruned_entries"] > 0
    elif v.name == "block":         # the block form with every module repaired: rank 3r everywhere
        assert all(f.rank == 3 * attacked.modules[n].rank for n, f in repaired)
        assert report["summary"]["self_transplant_change"] < 1e-6
    else:
        assert report["summary"]["self_transplant_change"] > 0.05          # the exact form erases cross terms
    if v.reference == "self":      # the fine-tune's own factors fill the masks: the exact form's erasure only
        assert report["settings"]["fill"]


def test_every_control_runs_through_the_pipeline_on_the_tiny_model(tmp_path, tiny_model_dir, root):
    """Each kind of control (forms, exact-self, magnitude and random masks, select-all and select-random,
    beta, RESTA, Antidote with its harmful-row scores stage, SafeLoRA) runs end to end through
    ``run_experiment``, and the report writes the controls summary with every variant and a default."""
    from conftest import TARGETS
    from nlsr.experiment.plan import run_experiment

    train = {"epochs": 1, "batch_size": 4, "max_length": 384}
    variants = [{"name": "exact-q0.2", "transplant": "exact", "q": 0.2},
                {"name": "block-q0.2", "transplant": "block", "q": 0.2},
                {"name": "factor-q0.2", "transplant": "factor", "q": 0.2},
                {"name": "exact-self-q0.2", "transplant": "exact", "reference": "self", "q": 0.2},
                {"name": "magnitude-q0.2", "masks": "magnitude", "q": 0.2},
                {"name": "random-q0.2", "masks": "random", "q": 0.2},
                {"name": "select-all-q0.2", "select": "all", "q": 0.2},
                {"name": "select-random-s0", "select": "random", "seed": 0},
                {"name": "resta-g1", "method": "resta", "gamma": 1.0},
                {"name": "antidote-s0.05", "method": "antidote", "sparsity": 0.05, "antidote_n": 4},
                {"name": "safelora", "method": "safelora", "threshold": 0.6}]
    sweeps = [{"variant": "exact-q0.2", "field": "q", "values": [0.4], "name": "exact-q{value}"},
              {"variant": "exact-q0.2", "field": "beta", "values": [2.0], "name": "beta{value}-q0.2"},
              {"variant": "select-random-s0", "field": "seed", "values": [1], "name": "select-random-s{value}"}]
    cfg = ExperimentConfig.model_validate({
        "name": "controls", "runs_dir": str(tmp_path / "runs"), "model": str(tiny_model_dir), "template": "chat",
        "precision": "float32", "device": "cpu", "lora": {"r": 2, "alpha": 4, "targets": list(TARGETS)},
        "align": {"sft": {**train, "n": 8}, "dpo": {**train, "n": 4}},
        "attack": {**train, "n": 8, "nonaligned_control": False},
        "realign": {"batch_size": 4, "max_length": 64, "calibration_n": 8, "controls_summary": True,
                    "variants": variants, "sweeps": sweeps},
        "evaluate": {"harmful_n": 4, "harmful_max_new_tokens": 2, "task_n": 2, "xstest_n": 0, "backend": "hf",
                     "judges": ["refusal"]}})
    run_dir = run_experiment(cfg, data=root, log=lambda _line: None)
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    names = {v["name"] for v in variants} | {"exact-q0.4", "beta2-q0.2", "select-random-s1"}
    assert names <= set(summary["variants"])
    assert summary["default"]["transplant"] in {"exact", "factor", "block"}
    block = summary["variants"]["block-q0.2"]
    assert block["self_transplant_change"] < 1e-6 < summary["variants"]["exact-q0.2"]["self_transplant_change"]
    scores = next(run_dir.glob("antidote-scores-n4*"))          # one seed: no seed suffix
    rows = [json.loads(line) for line in (scores / "harmful_rows.jsonl").open()]
    assert len(rows) == 4 and all(r["prompt"] and r["response"] for r in rows)
    assert (run_dir / "report" / "frontier.png").stat().st_size > 0
    at_equal_cost = summary["equal_fa"]
    # every curve across a knob, read at the default FA costs; draws of the selection are no curve
    assert set(at_equal_cost["curves"]) == {"exact-q", "beta-q0.2"} and at_equal_cost["targets"] == [2.0, 5.0, 10.0]
    assert "## The curves at equal FA cost" in (run_dir / "report" / "report.md").read_text()


def test_a_defences_own_aligned_model_is_a_reference_point():
    from nlsr.experiment.frontier import is_reference

    assert is_reference("aligned") and is_reference("aligned-vaccine") and is_reference("attacked-p0")
    assert not is_reference("vaccine") and not is_reference("block-q0.3") and not is_reference("nonaligned-x")
