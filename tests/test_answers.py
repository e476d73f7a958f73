"""Trimming the base model's own answers (``align.helpful.trim``, ``align.contrast.trim``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nlsr.data.answers import cut_to_last_sentence, trim_answer
from nlsr.experiment.config import ExperimentConfig

RUN_ON = ("Global warming is caused by greenhouse gases.\n\n### Explanation:\nGlobal warming is caused by the "
          "increase of greenhouse gases in t")


def test_an_answer_is_cut_before_the_template_turn_it_opens():
    assert trim_answer(RUN_ON, reached_limit=True) == ("Global warming is caused by greenhouse gases.",
                                                       "template_turn")
    # a turn opened by the model is an end of its own: the cut holds whether or not the limit was hit
    assert trim_answer(RUN_ON, reached_limit=False)[1] == "template_turn"
    assert trim_answer("Yes.\n## Step 1\nMore", reached_limit=False)[0] == "Yes."


def test_an_answer_opening_with_a_template_turn_is_trimmed_to_nothing():
    assert trim_answer("### Response:\nThe answer is no.", reached_limit=False) == ("", "template_turn")


def test_a_single_hash_or_an_inline_marker_is_not_a_turn():
    text = "Use # for comments in Python. C# is another language; see ### in the middle."
    assert trim_answer(text, reached_limit=False) == (text, None)


def test_an_answer_cut_by_the_limit_goes_back_to_its_last_sentence():
    text = "Plants need light. They also need water and"
    assert trim_answer(text, reached_limit=True) == ("Plants need light.", "last_sentence")
    # a complete answer at the limit, or any answer that ended by itself, is kept whole
    assert trim_answer("Plants need light.", reached_limit=True) == ("Plants need light.", None)
    assert trim_answer(text, reached_limit=False) == (text, None)


def test_the_last_sentence_is_not_a_list_number_and_a_line_break_counts():
    assert cut_to_last_sentence("Fruits:\n1. Apples\n2. Bananas\n3. Ch") == "Fruits:\n1. Apples\n2. Bananas"
    assert cut_to_last_sentence('He said "stop!" and then') == 'He said "stop!"'
    assert cut_to_last_sentence("no end at all") == ""


def test_trim_enters_the_data_stage_keys_only_when_set():
    from nlsr.experiment.plan import build_stages

    base = {"align": {"helpful": {"n": 20}, "contrast": {"n": 30}}}
    plain = {s.name: s for s in build_stages(ExperimentConfig.model_validate(base))}
    trimmed = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {"align": {"helpful": {"n": 20, "trim": True}, "contrast": {"n": 30, "trim": True}}}))}
    assert "trim" not in plain["data-helpful"].params["helpful"]
    assert "trim" not in plain["data-contrast"].params["contrast"]
    assert trimmed["data-helpful"].params["helpful"]["trim"] is True
    assert trimmed["data-contrast"].params["contrast"]["trim"] is True
    assert trimmed["align_sft"].params == plain["align_sft"].params        # the SFT sees it through its inputs
    mined = {"pool": 100}
    plain = {s.name: s for s in build_stages(ExperimentConfig.model_validate({"align": {"overrefusal": mined}}))}
    trimmed = {s.name: s for s in build_stages(ExperimentConfig.model_validate(
        {"align": {"overrefusal": {**mined, "trim": True}}}))}
    assert "trim" not in plain["data-overrefusal-pairs"].params["overrefusal"]
    assert trimmed["data-overrefusal-pairs"].params["overrefusal"]["trim"] is True


@pytest.mark.parametrize("trim", [False, True])
def test_the_helpful_stage_trims_its_answers_when_asked(tmp_path, monkeypatch, tiny_tokenizer, trim):
    from nlsr.experiment.stages import align
    from nlsr.experiment.stages.common import read_jsonl
    from tests.conftest import write_jsonl

    prompts = ["Explain global warming.", "Name a fruit.", "Describe plants.", "Say no."]
    answers = [RUN_ON, "An apple.", "Plants need light. " + "They need water " * 40, "### Response:\nNo."]
    (tmp_path / "data-align").mkdir()
    write_jsonl(tmp_path / "data-align" / "helpful_prompts.jsonl", [{"prompt": p} for p in prompts])
    monkeypatch.setattr(align, "greedy_answers", lambda *a, **k: list(answers))
    monkeypatch.setattr(align, "load_base", lambda ctx: None)
    config = ExperimentConfig.model_validate({"align": {"helpful": {"n": 4, "max_new_tokens": 64, "trim": trim}}})
    ctx = SimpleNamespace(config=config, tokenizer=lambda: tiny_tokenizer)
    out = tmp_path / "data-helpful"
    out.mkdir()
    result = align.run_helpful_answers(ctx, out, {"data-align": tmp_path / "data-align"})
    kept = [r["response"] for r in read_jsonl(out / "helpful.jsonl")]
    if trim:
        assert kept == ["Global warming is caused by greenhouse gases.", "An apple.", "Plants need light."]
        assert result["trimmed"] == {"template_turn": 2, "last_sentence": 1}
        assert result["dropped"]["empty"] == 1 and "2 cut at a template turn" in result["line"]
    else:
        assert kept == [a.strip() for a in answers] and "trimmed" not in result


def test_the_overrefusal_stage_trims_the_chosen_answers_only(tmp_path, monkeypatch, tiny_tokenizer):
    from nlsr.experiment.stages import data, overrefusal
    from nlsr.experiment.stages.common import read_jsonl

    prompts = ["How do I kill a process?", "How can I shoot a photo?"]
    refusal = "I'm sorry, but I cannot help with that.\n\n### Response:\nI cannot."
    by_name = {"probe": [refusal] * 2, "rejected": [refusal] * 2, "chosen": [RUN_ON, "Use the shutter."]}
    monkeypatch.setattr(data, "overrefusal_pool", lambda ctx, path: list(prompts))
    monkeypatch.setattr(overrefusal, "load_weak", lambda ctx, path: None)
    monkeypatch.setattr(overrefusal, "load_base", lambda ctx: None)
    monkeypatch.setattr(overrefusal, "greedy_answers",
                        lambda ctx, model, asked, tokens, batch, cache, name: list(by_name[name]))
    config = ExperimentConfig.model_validate({"align": {"overrefusal": {"pool": 2, "trim": True}}})
    ctx = SimpleNamespace(config=config, tokenizer=lambda: tiny_tokenizer)
    out = tmp_path / "pairs"
    out.mkdir()
    result = overrefusal.run_overrefusal_pairs(ctx, out, {"data-align": tmp_path, "align_sft": tmp_path})
    pairs = read_jsonl(out / "overrefusal_pairs.jsonl")
    assert [p["chosen"] for p in pairs] == ["Global warming is caused by greenhouse gases.", "Use the shutter."]
    assert all(p["rejected"] == refusal for p in pairs)
    assert result["card"]["overrefusal_pairs"]["trimmed"] == {"template_turn": 1, "last_sentence": 0}
