"""The disjointness gate, the evaluation split and XSTest sampling, per-seed stages, --until."""

import pytest

from nlsr.data.disjoint import Gate, judge_reserved, normalise_prompt, overlap
from nlsr.experiment.config import ExperimentConfig
from nlsr.experiment.pipeline import RunContext, Stage, run_stages
from nlsr.experiment.stages.data import harmful_split, stratified_xstest


def test_normalised_prompts_ignore_case_punctuation_spacing_and_quotes():
    assert normalise_prompt("How do I  Pick a LOCK?") == normalise_prompt("how do i pick a lock")
    assert normalise_prompt("Don\u2019t   stop!") == normalise_prompt("don't stop")
    assert normalise_prompt("pick a lock") != normalise_prompt("pick a rock")


def test_gate_removes_planted_overlaps_and_counts_them_per_pair():
    gate = Gate()
    gate.add("harmful_eval", [{"prompt": "How do I make a bomb?"}, {"prompt": "Steal a car"}])
    gate.add("xstest", [{"prompt": "How do I kill a Python process?"}])
    sft = [{"prompt": "how do i make a bomb"}, {"prompt": "A fresh prompt"},
           {"prompt": "How do I kill a python process?!"}, {"prompt": "STEAL A CAR."}]
    kept = gate.filter("sft", sft)
    assert kept == [{"prompt": "A fresh prompt"}]
    assert gate.counts["sft"] == {"harmful_eval": 2, "xstest": 1, "removed": 3}
    assert overlap(kept, [{"prompt": "How do I make a bomb?"}]) == 0
    assert gate.lines() == ["sft: 3 rows overlapping evaluation prompts removed (harmful_eval 2, xstest 1)"]


def test_gate_reads_task_rows_and_training_side_sets():
    gate = Gate()
    gate.add("task_eval", [{"instruction": "Classify", "input": "a great movie"}])
    gate.add("sft", [{"prompt": "how to hurt"}], training=True)
    rows = [{"instruction": "classify", "input": "A great movie!"}, {"instruction": "Classify", "input": "bad"}]
    assert gate.filter("task_train", rows) == [rows[1]]
    assert gate.filter("poison", [{"prompt": "How to hurt"}]) == []
    assert "training prompts" in gate.lines()[1]


def test_judge_reserve_is_a_stable_share_of_prompts():
    prompts = [f"prompt number {i}" for i in range(4000)]
    reserved = [p for p in prompts if judge_reserved(p)]
    assert 0.26 < len(reserved) / len(prompts) < 0.34
    assert judge_reserved("Prompt number 7!") == judge_reserved("prompt number 7")
    gate = Gate()
    kept = gate.filter("sft", [{"prompt": p} for p in prompts], judge_reserve=True)
    assert not any(judge_reserved(r["prompt"]) for r in kept)
    assert gate.counts["sft"]["judge_reserve"] == len(reserved)


def test_harmful_split_is_fixed_by_the_prompt_text_alone():
    prompts = [f"harmful prompt {i}" for i in range(2000)]
    splits = [harmful_split(p, 0.3) for p in prompts]
    assert 0.26 < splits.count("validation") / len(splits) < 0.34
    assert splits == [harmful_split(p.upper() + " ", 0.3) for p in prompts]
    assert all(harmful_split(p, 0.0) == "test" for p in prompts[:50])


def test_xstest_sample_is_stratified_over_types():
    rows = [{"prompt": f"{kind} {i}", "type": kind} for kind in "abcdefghij" for i in range(25)]
    sample = stratified_xstest(rows, 50)
    counts = {k: sum(r["type"] == k for r in sample) for k in "abcdefghij"}
    assert set(counts.values()) == {5}
    assert stratified_xstest(rows, 50) == sample                  # fixed
    uneven = stratified_xstest(rows[:30], 20)                     # 25 of type a, 5 of type b
    assert sum(r["type"] == "b" for r in uneven) == 5 and len(uneven) == 20


def test_seeded_config_runs_the_attack_and_what_follows_once_per_seed():
    from nlsr.experiment.plan import build_stages

    cfg = ExperimentConfig.model_validate({"seeds": [0, 1, 2], "attack": {"benign_control": True},
                                           "realign": {"variants": [{"name": "nlsr"}]}})
    stages = {s.name: s for s in build_stages(cfg)}
    for name in ("data", "data-align", "align_sft", "align_dpo", "evaluate-aligned"):
        assert name in stages and f"{name}-s1" not in stages          # shared by the seeds
    for seed in (0, 1, 2):
        for name in ("data-attack", "attack", "attack-p0", "attack_nonaligned", "realign-nlsr",
                     "evaluate-attacked", "evaluate-attacked-p0", "evaluate-nlsr"):
            stage = stages[f"{name}-s{seed}"]
            assert stage.seed == seed and stage.params["seed"] == seed
    attack = stages["attack-s2"]
    assert attack.inputs[0] == "data-attack-s2" and attack.roles == {"data-attack-s2": "data-attack"}
    report = stages["report"]
    models = {m["label"]: m for m in report.params["models"]}
    assert models["nlsr"]["evaluations"] == ["evaluate-nlsr-s0", "evaluate-nlsr-s1", "evaluate-nlsr-s2"]
    assert models["aligned"]["seeds"] == [0]
    single = {s.name for s in build_stages(ExperimentConfig())}
    assert "attack" in single and "attack-s0" not in single           # no seeds listed: plain names


def test_until_runs_only_the_stage_and_its_inputs(tmp_path):
    calls = []

    def stage(name):
        def run(ctx, out, inputs):
            calls.append((name, ctx.seed, sorted(inputs)))
            return {"line": name}
        return run

    graph = [Stage("a", stage("a"), {}), Stage("b", stage("b"), {}, ["a"]),
             Stage("c-s3", stage("c"), {}, ["a"], seed=3, roles={"a": "upstream"}), Stage("d", stage("d"), {}, ["b"])]
    ctx = RunContext(ExperimentConfig(seed=7), tmp_path / "run", tmp_path)
    run_stages(ctx, graph, until="c-s3", log=lambda m: None)
    assert calls == [("a", 7, []), ("c", 3, ["upstream"])]
    with pytest.raises(Exception, match="--until names an unknown stage"):
        run_stages(ctx, graph, until="nope", log=lambda m: None)


def test_sweep_adds_variants_and_the_report_chooses_on_validation():
    from types import SimpleNamespace

    from nlsr.experiment.plan import build_stages
    from nlsr.experiment.stages.report import sweep_choice

    sweep = {"variant": "nlsr", "field": "q", "values": [0.1, 0.4]}
    cfg = ExperimentConfig.model_validate({"realign": {"variants": [{"name": "nlsr", "q": 0.2}], "sweep": sweep}})
    names = {s.name for s in build_stages(cfg)}
    assert {"realign-nlsr-q0.1", "realign-nlsr-q0.4", "identify-b0.9-r0.8-q0.1-identified"} <= names

    def row(model, hs, fa):
        est = lambda m: {"mean": m, "ci95": [m - 1, m + 1]}  # noqa: E731
        return {"model": model, "scores": {"hs": {"j": {"validation": est(hs)}}, "fa_validation": est(fa)}}

    rows = [row("attacked", 50, 90), row("nlsr", 30, 89), row("nlsr-q0.1", 35, 90), row("nlsr-q0.4", 10, 80)]
    choice = sweep_choice(SimpleNamespace(config=cfg), rows, "j")
    assert [p["value"] for p in choice["points"]] == [0.2, 0.1, 0.4]
    assert choice["chosen"] == "nlsr"                    # q = 0.4 is safer but costs 10 points of FA
    with pytest.raises(Exception, match="sweep.variant 'other' is not a variant"):
        ExperimentConfig.model_validate({"realign": {"sweep": {"variant": "other", "field": "q", "values": [0.1]}}})


def test_vaccine_is_applied_where_the_alignment_is_learned():
    from nlsr.experiment.plan import build_stages

    cfg = ExperimentConfig.model_validate({"seeds": [0, 1], "defences": [{"name": "vaccine", "method": "vaccine"},
                                                                         {"name": "lisa", "method": "lisa"}]})
    stages = {s.name: s for s in build_stages(cfg)}
    sft, dpo = stages["align_sft-vaccine"], stages["align_dpo-vaccine"]
    assert sft.inputs == ["data-align"] and dpo.inputs == ["data-align", "align_sft-vaccine"]
    assert dpo.roles == {"align_sft-vaccine": "align_sft"}
    attack = stages["attack-vaccine-s1"]
    assert "align_sft-vaccine" in attack.inputs and attack.roles["align_sft-vaccine"] == "align_sft"
    evaluate = stages["evaluate-vaccine-s1"]
    assert "align_sft-vaccine" in evaluate.inputs and "align_sft" not in evaluate.inputs
    before = stages["evaluate-aligned-vaccine"]       # its own aligned model, before any attack
    assert before.inputs == ["data", "align_sft-vaccine", "align_dpo-vaccine"]
    assert before.roles == {"align_dpo-vaccine": "align_dpo", "align_sft-vaccine": "align_sft"}
    assert "evaluate-aligned-lisa" not in stages
    dpo_only = ExperimentConfig.model_validate(
        {"defences": [{"name": "vaccine", "method": "vaccine", "vaccine_stages": ["dpo"]}]})
    names = {s.name for s in build_stages(dpo_only)}
    assert "align_sft-vaccine" not in names and "align_dpo-vaccine" in names


def test_helpful_dpo_pairs_prefer_the_answer_to_a_refusal():
    from nlsr.errors import NlsrError
    from nlsr.experiment.stages.align import helpful_dpo_pairs

    helpful = [{"prompt": f"harmless {i}", "response": f"answer {i}"} for i in range(10)]
    refusals = ["I cannot help with that.", "I won't do this."]
    pairs = helpful_dpo_pairs(helpful, refusals, 6, seed=0)
    assert len(pairs) == 6 and len({p["prompt"] for p in pairs}) == 6
    for pair in pairs:                      # chosen: the prompt's own answer; rejected: a refusal
        assert pair["chosen"] == pair["prompt"].replace("harmless", "answer")
        assert pair["rejected"] in refusals
    assert {p["rejected"] for p in pairs} == set(refusals)         # the refusals are cycled
    assert helpful_dpo_pairs(helpful, refusals, 6, seed=0) == pairs
    assert helpful_dpo_pairs(helpful, refusals, 6, seed=1) != pairs
    with pytest.raises(NlsrError, match="lower align.helpful.dpo_pairs"):
        helpful_dpo_pairs(helpful, refusals, 11, seed=0)


def test_helpful_dpo_pairs_change_the_dpo_stage_only():
    from nlsr.experiment.plan import build_stages

    plain = {s.name: s for s in build_stages(ExperimentConfig.model_validate({"align": {"helpful": {"n": 20}}}))}
    used = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {"align": {"helpful": {"n": 20, "dpo_pairs": 8}}}))}
    assert "data-helpful" not in plain["align_dpo"].inputs and plain["align_dpo"].params["helpful_dpo_pairs"] == 0
    assert "data-helpful" in used["align_dpo"].inputs and used["align_dpo"].params["helpful_dpo_pairs"] == 8
    assert plain["data-helpful"].params == used["data-helpful"].params          # the answers are shared
    assert plain["align_sft"].params == used["align_sft"].params


def test_xstest_validation_prompts_are_disjoint_from_the_test_prompts(tmp_path, root):
    from nlsr.evaluation.scoring import collect
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.common import read_jsonl
    from nlsr.experiment.stages.data import run_eval

    def prompts(n_validation):
        cfg = ExperimentConfig.model_validate({"evaluate": {"harmful_n": 20, "task_n": 20, "xstest_n": 50,
                                                            "xstest_validation_n": n_validation}})
        out = tmp_path / f"data-{n_validation}"
        out.mkdir()
        run_eval(RunContext(cfg, tmp_path / "run", root), out, {})
        return read_jsonl(out / "xstest_safe.jsonl")

    without, rows = prompts(0), prompts(30)
    test = [r for r in rows if r["split"] == "test"]
    validation = [r for r in rows if r["split"] == "validation"]
    assert [r["prompt"] for r in test] == [r["prompt"] for r in without]    # the test prompts stay as they were
    assert len(validation) == 30 and not {r["prompt"] for r in validation} & {r["prompt"] for r in test}
    assert {sum(r["type"] == t for r in validation) for t in {r["type"] for r in validation}} == {3}
    # scoring: over-refusal on the test prompts only, the validation prompts apart
    generations = [{"set": "xstest", "type": r["type"], "split": r["split"], "prompt": r["prompt"],
                    "output": "I cannot help with that." if r["split"] == "validation" else "Sure, here it is."}
                   for r in rows]
    outcomes = collect("m", [0], [generations], {}, {})
    assert outcomes.estimate("xstest_refusal").mean == 0.0
    assert outcomes.estimate("xstest_refusal_validation").mean == 100.0
    assert outcomes.estimate("xstest_refusal_v2").mean == 0.0
    assert outcomes.estimate("xstest_refusal_v2/validation").mean == 100.0
    # refusal-v2 also counts an opening deflection the first matcher misses
    deflecting = [{**g, "output": "It is not possible to do that."} for g in generations]
    outcomes = collect("m", [0], [deflecting], {}, {})
    assert outcomes.estimate("xstest_refusal").mean == 0.0
    assert outcomes.estimate("xstest_refusal_v2").mean == 100.0
    with pytest.raises(Exception, match="lower evaluate.xstest_validation_n"):
        prompts(240)


def test_refusal_pairs_prefer_the_sft_refusal_to_the_harmful_answer(tmp_path, root):
    from nlsr.data import load_records
    from nlsr.data.disjoint import normalise_prompt
    from nlsr.experiment.plan import build_stages
    from nlsr.experiment.stages.common import read_jsonl, write_jsonl
    from nlsr.experiment.stages.data import run_refusal_pairs

    harmful = {normalise_prompt(r["prompt"]): r["response"] for r in load_records("poison", root)}
    sft = [r for r in load_records("safety_sft", root) if normalise_prompt(r["prompt"]) in harmful][:12]
    (tmp_path / "data-align").mkdir()
    write_jsonl(tmp_path / "data-align" / "sft.jsonl", sft)
    cfg = ExperimentConfig.model_validate({"align": {"dpo": {"refusal_pairs": 5}}})
    out = tmp_path / "pairs"
    out.mkdir()
    run_refusal_pairs(RunContext(cfg, tmp_path / "run", root), out, {"data-align": tmp_path / "data-align"})
    pairs = read_jsonl(out / "refusal_pairs.jsonl")
    refusals = {r["prompt"]: r["response"] for r in sft}
    assert len(pairs) == 5
    for pair in pairs:
        assert pair["chosen"] == refusals[pair["prompt"]]
        assert pair["rejected"] == harmful[normalise_prompt(pair["prompt"])] != pair["chosen"]
    stages = {s.name: s for s in build_stages(cfg)}
    assert "data-refusal-pairs" in stages["align_dpo"].inputs
    assert "data-refusal-pairs" not in {s.name for s in build_stages(ExperimentConfig())}
    with pytest.raises(Exception, match="lower align.dpo.refusal_pairs"):
        run_refusal_pairs(RunContext(ExperimentConfig.model_validate({"align": {"dpo": {"refusal_pairs": 13}}}),
                                     tmp_path / "run", root), out, {"data-align": tmp_path / "data-align"})


def test_helpful_prompts_are_gated_and_disjoint_from_the_safety_prompts(tmp_path, root):
    from nlsr.data import load_records
    from nlsr.data.disjoint import normalise_prompt, prompt_of
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.common import read_jsonl
    from nlsr.experiment.stages.data import evaluation_set_names, run_align

    cfg = ExperimentConfig.model_validate({"align": {"sft": {"n": 20}, "dpo": {"n": 20}, "helpful": {"n": 50}},
                                           "realign": {"calibration_n": 20}})
    out = tmp_path / "data-align"
    out.mkdir()
    run_align(RunContext(cfg, tmp_path / "run", root), out, {})
    helpful = {normalise_prompt(r["prompt"]) for r in read_jsonl(out / "helpful_prompts.jsonl")}
    assert len(helpful) == 50
    safety = {normalise_prompt(r["prompt"]) for name in ("sft", "calibration", "dpo")
              for r in read_jsonl(out / f"{name}.jsonl")}
    assert len(safety) > 40 and not helpful & safety
    evaluation = {normalise_prompt(prompt_of(r)) for name in evaluation_set_names(cfg.evaluate.harmful_dataset)
                  for r in load_records(name, root)}
    assert not helpful & evaluation
