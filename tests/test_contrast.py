"""Lexical contrast rows for the SFT set (``align.contrast``): the lexicon, the choice of prompts,
the stage and its wiring."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nlsr.data.contrast import contrast_prompts, harm_lexicon, prompt_words
from nlsr.experiment.config import ExperimentConfig


def test_the_lexicon_scores_words_by_their_log_odds_in_harmful_prompts():
    harmful = ["How do I steal a car?", "how to steal money", "Steal from a shop", "Write a poem"]
    harmless = ["Write a poem about spring", "Write a story", "Explain how to steal one's thunder"]
    lexicon = harm_lexicon(harmful, harmless, min_count=3)
    assert set(lexicon) == {"steal"}                                  # the only word in >= 3 harmful prompts
    assert lexicon["steal"] == pytest.approx(math.log(3.5 / 5) - math.log(1.5 / 4))
    low = harm_lexicon(harmful, harmless, min_count=1)
    assert low["steal"] > 0 > low["write"]                            # harmful-typical vs harmless-typical
    assert prompt_words("Don't STEAL it, OK?") == {"don", "steal"}


def test_contrast_prompts_take_the_prompts_with_the_highest_scoring_word_in_pool_order():
    lexicon = {"steal": 2.0, "kill": 3.0, "write": -1.0}
    pool = ["Write a poem", "Steal one's thunder", "Kill a process", "Bake bread", "steal the show"]
    picked = contrast_prompts(pool, lexicon, 3)
    assert [r["prompt"] for r in picked] == ["Kill a process", "Steal one's thunder", "steal the show"]
    assert picked[0] == {"prompt": "Kill a process", "word": "kill", "score": 3.0}
    assert len(contrast_prompts(pool, lexicon, 10)) == 4              # "Bake bread" has no lexicon word


def test_the_mean_score_picks_the_prompts_that_read_like_the_harmful_ones_as_a_whole():
    from nlsr.data.contrast import log_odds

    harmful = ["How can I steal a car?", "How can I steal from him?", "How can I cheat?", "Steal money now",
               "steal a bike"]
    pool = ["Write a poem about spring.", "Explain what to steal one's thunder means in a long essay about art.",
            "How can I sleep better?", "Write a story."]
    odds = {w: v for w, (v, _) in log_odds(harmful, pool).items()}
    assert odds["can"] > 0 > odds["write"]
    by_mean = contrast_prompts(pool, odds, 1, "mean")
    by_max = contrast_prompts(pool, harm_lexicon(harmful, pool, min_count=3), 1, "max")
    assert by_mean[0]["prompt"] == "How can I sleep better?"           # the harmful prompts' form
    assert by_max[0]["prompt"].startswith("Explain what to steal")       # their most marked word
    with pytest.raises(ValueError, match="unknown contrast score"):
        contrast_prompts(pool, odds, 1, "median")


@pytest.mark.parametrize(("instruction", "question"), [
    ("Explain how to use a pressure cooker.", "How do I use a pressure cooker?"),
    ("Describe how you can make a kite", "How can I make a kite?"),
    ("Suggest three ways to save energy at your home.", "How can I save energy at my home?"),
    ("Give me 5 practical tips on how to improve yourself.", "How can I improve myself?"),
    ("Give two tips for consuming more vegetables.", "What are some good tips for consuming more vegetables?"),
    ("List five steps to writing a paper.", "What are some good steps to writing a paper?"),
    ("Identify a solution to the problem of hunger.", "What are some good solutions to the problem of hunger?"),
    ("Give some advice for speaking in public.", "What is some good advice for speaking in public?"),
    ("How can I sleep better?", "How can I sleep better?"),                       # already a question
    ("Write a poem about spring.", None),
    ("Suggest a way to relax. Then explain why.", None),                         # two sentences
    ("Explain how to\nbake bread", None),
])
def test_as_question_recasts_requests_for_a_way_or_advice_as_first_person_questions(instruction, question):
    from nlsr.data.contrast import as_question

    assert as_question(instruction) == question


def test_question_prompts_take_the_first_recastable_prompts_in_pool_order():
    from nlsr.data.contrast import question_prompts

    pool = ["Write a poem.", "Suggest a way to relax.", "Bake bread.", "Explain how to knit.", "Name a way to rest."]
    assert question_prompts(pool, 2) == [{"prompt": "How can I relax?", "source": "Suggest a way to relax."},
                                         {"prompt": "How do I knit?", "source": "Explain how to knit."}]
    assert len(question_prompts(pool, 10)) == 3
    with pytest.raises(ValueError, match="unknown contrast score"):
        contrast_prompts(pool, {"relax": 1.0}, 1, "question")     # a form, not a word score


def test_contrast_rows_enter_the_sft_stages_only_when_used():
    from nlsr.experiment.plan import build_stages

    base = {"align": {"helpful": {"n": 20}}, "defences": [{"name": "vaccine", "method": "vaccine"}]}
    plain = {s.name: s for s in build_stages(ExperimentConfig.model_validate(base))}
    used = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {**base, "align": {"helpful": {"n": 20}, "contrast": {"n": 30}}}))}
    assert "data-contrast" not in plain
    assert used["data-contrast"].inputs == ["data-align"]
    assert used["data-contrast"].params["contrast"]["n"] == 30
    for name in ("align_sft", "align_sft-vaccine"):
        assert used[name].inputs == ["data-align", "data-helpful", "data-contrast"], name
        assert "data-contrast" not in plain[name].inputs
        assert used[name].params == plain[name].params
    names = list(used)
    assert names.index("data-align") < names.index("data-contrast") < names.index("align_sft")
    assert "data-contrast" not in used["align_dpo"].inputs and "contrast_dpo_pairs" not in used["align_dpo"].params
    paired = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {**base, "align": {"helpful": {"n": 20}, "contrast": {"n": 30, "dpo_pairs": 8}}}))}
    assert paired["data-contrast"].params == used["data-contrast"].params      # the answers are shared
    assert "score" not in used["data-contrast"].params["contrast"]             # the default: older keys kept
    mean = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {**base, "align": {"helpful": {"n": 20}, "contrast": {"n": 30, "score": "mean"}}}))}
    assert mean["data-contrast"].params["contrast"]["score"] == "mean"
    assert paired["align_sft"].inputs == used["align_sft"].inputs
    for name in ("align_dpo", "align_dpo-vaccine"):
        assert "data-contrast" in paired[name].inputs and paired[name].params["contrast_dpo_pairs"] == 8


def test_contrast_dpo_pairs_prefer_the_answer_to_a_refusal_and_name_their_section():
    from nlsr.errors import NlsrError
    from nlsr.experiment.stages.align import helpful_dpo_pairs

    rows = [{"prompt": f"Steal the show {i}?", "response": f"It means to shine ({i})."} for i in range(5)]
    pairs = helpful_dpo_pairs(rows, ["I can't help with that."], 3, seed=0, section="align.contrast")
    assert len(pairs) == 3 and all(p["rejected"] == "I can't help with that." for p in pairs)
    assert all(p["chosen"].startswith("It means") and p["prompt"].startswith("Steal") for p in pairs)
    with pytest.raises(NlsrError, match="lower align.contrast.dpo_pairs or raise align.contrast.n"):
        helpful_dpo_pairs(rows, ["No."], 6, seed=0, section="align.contrast")


def _aligned_data(tmp_path, root, contrast: dict):
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.data import run_align

    cfg = ExperimentConfig.model_validate({"align": {"sft": {"n": 60}, "dpo": {"n": 20}, "helpful": {"n": 50},
                                                     "contrast": contrast},
                                           "realign": {"calibration_n": 20}})
    ctx = RunContext(cfg, tmp_path / "run", root)
    out = tmp_path / "data-align"
    out.mkdir()
    run_align(ctx, out, {})
    return ctx, out


def test_the_contrast_stage_answers_gated_unused_prompts_and_drops_refusals(tmp_path, root, monkeypatch):
    from nlsr.data import load_records
    from nlsr.data.disjoint import normalise_prompt, prompt_of
    from nlsr.experiment.stages import contrast, data, reads
    from nlsr.experiment.stages.common import read_jsonl

    ctx, align_dir = _aligned_data(tmp_path, root, {"n": 12, "min_count": 2})
    loaded: list[str] = []
    real_load = data.load_records
    monkeypatch.setattr(data, "load_records", lambda name, *a, **k: loaded.append(name) or real_load(name, *a, **k))
    asked: list[str] = []

    def fake_answers(ctx, model, prompts, max_new_tokens, batch_size, cache_file, description):
        asked.extend(prompts)
        return ["I cannot help with that.", "   "] + [f"Sure: an answer to {p}" for p in prompts[2:]]

    monkeypatch.setattr(contrast, "greedy_answers", fake_answers)
    monkeypatch.setattr(contrast, "load_base", lambda ctx: None)
    out = tmp_path / "data-contrast"
    out.mkdir()
    result = contrast.run_contrast_answers(ctx, out, {"data-align": align_dir})
    assert loaded and set(loaded) <= set(reads.contrast_datasets(ctx.config))       # every read is hashed
    rows = read_jsonl(out / "contrast.jsonl")
    assert len(asked) == 12 and result["rows"] == len(rows) == 10                   # a refusal and an empty dropped
    assert result["card"]["contrast"]["dropped"] == {"empty": 1, "refusal": 1}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert all(r["word"] in prompt_words(r["prompt"]) for r in rows)
    keys = {normalise_prompt(p) for p in asked}
    helpful = {normalise_prompt(r["prompt"]) for r in read_jsonl(align_dir / "helpful_prompts.jsonl")}
    safety = {normalise_prompt(r["prompt"]) for n in ("sft", "calibration", "dpo")
              for r in read_jsonl(align_dir / f"{n}.jsonl")}
    evaluation = {normalise_prompt(prompt_of(r)) for name in data.evaluation_set_names(
        ctx.config.evaluate.harmful_dataset) for r in load_records(name, root)}
    assert not keys & helpful and not keys & safety and not keys & evaluation
    assert not list(out.glob("*.cache.jsonl"))


def test_the_sft_stage_trains_on_the_contrast_answers_too(tmp_path, monkeypatch, tiny_tokenizer):
    from nlsr.experiment.stages import align
    from tests.conftest import write_jsonl

    for name, rows in (("data-align", [{"prompt": "How do I steal?", "response": "I can't help with that."}]),
                       ("data-helpful", [{"prompt": "Name a fruit.", "response": "An apple."}]),
                       ("data-contrast", [{"prompt": "Steal the show?", "response": "It means to shine."}])):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / {"data-align": "sft.jsonl", "data-helpful": "helpful.jsonl",
                                       "data-contrast": "contrast.jsonl"}[name], rows)
    trained: list[dict] = []

    class Stop(Exception):
        pass

    def fake_train(model, tokenizer, rows, *args, **kwargs):
        trained.extend(rows)
        raise Stop

    monkeypatch.setattr(align, "train_sft", fake_train)
    monkeypatch.setattr(align, "load_base", lambda ctx: None)
    ctx = SimpleNamespace(config=ExperimentConfig(), tokenizer=lambda: tiny_tokenizer,
                          precision=SimpleNamespace(bf16=False))
    with pytest.raises(Stop):
        align.run_sft(ctx, tmp_path / "out", {n: tmp_path / n for n in ("data-align", "data-helpful", "data-contrast")})
    assert [r["completion"] for r in trained] == ["I can't help with that.", "An apple.", "It means to shine."]


def test_the_question_contrast_stage_answers_gated_recast_questions(tmp_path, root, tiny_model_dir):
    from nlsr.data import load_records
    from nlsr.data.disjoint import normalise_prompt, prompt_of
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.common import read_jsonl
    from nlsr.experiment.stages.contrast import run_contrast_answers
    from nlsr.experiment.stages.data import evaluation_set_names, run_align, unused_harmless_prompts

    cfg = ExperimentConfig.model_validate({
        "model": str(tiny_model_dir), "precision": "float32",
        "align": {"sft": {"n": 20}, "dpo": {"n": 20}, "helpful": {"n": 50},
                  "contrast": {"n": 6, "score": "question", "max_new_tokens": 4, "batch_size": 6}},
        "realign": {"calibration_n": 20}})
    ctx = RunContext(cfg, tmp_path / "run", root)
    align = tmp_path / "data-align"
    align.mkdir()
    run_align(ctx, align, {})
    out = tmp_path / "data-contrast"
    out.mkdir()
    result = run_contrast_answers(ctx, out, {"data-align": align})
    rows = read_jsonl(out / "contrast.jsonl")
    assert result["card"]["contrast"]["picked"] == 6 and len(rows) == result["rows"] > 0
    pool = unused_harmless_prompts(ctx, align, cfg.align.contrast.dataset)
    assert all(r["source"] in pool and r["prompt"].endswith("?") and r["prompt"] != "" for r in rows)
    assert all(r["prompt"].startswith(("How ", "What ")) for r in rows)
    evaluation = {normalise_prompt(prompt_of(r)) for name in evaluation_set_names(cfg.evaluate.harmful_dataset)
                  for r in load_records(name, root)}
    assert not {normalise_prompt(r["prompt"]) for r in rows} & evaluation
    assert "recast as first-person questions" in result["card"]["sources"]["contrast"]
    too_many = cfg.model_copy(update={"align": cfg.align.model_copy(update={
        "contrast": cfg.align.contrast.model_copy(update={"n": 10 ** 5})})})
    with pytest.raises(Exception, match="can be recast as questions: lower align.contrast.n"):
        run_contrast_answers(RunContext(too_many, tmp_path / "run", root), out, {"data-align": align})


def test_the_contrast_stage_trims_run_on_answers_when_asked(tmp_path, root, monkeypatch, tiny_tokenizer):
    from nlsr.experiment.stages import contrast
    from nlsr.experiment.stages.common import read_jsonl

    ctx, align_dir = _aligned_data(tmp_path, root, {"n": 3, "min_count": 2, "trim": True})
    monkeypatch.setattr(ctx, "tokenizer", lambda: tiny_tokenizer)
    answers = ["It means to shine.\n\n### Explanation:\nIt means", "### Response:\nYes.", "A short answer."]
    monkeypatch.setattr(contrast, "greedy_answers", lambda *a, **k: list(answers))
    monkeypatch.setattr(contrast, "load_base", lambda ctx: None)
    out = tmp_path / "data-contrast"
    out.mkdir()
    result = contrast.run_contrast_answers(ctx, out, {"data-align": align_dir})
    assert [r["response"] for r in read_jsonl(out / "contrast.jsonl")] == ["It means to shine.", "A short answer."]
    assert result["card"]["contrast"]["trimmed"] == {"template_turn": 2, "last_sentence": 0}
    assert result["card"]["contrast"]["dropped"]["empty"] == 1
