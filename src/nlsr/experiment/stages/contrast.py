"""Helpful answers to lexical contrast prompts, for the SFT set (``align.contrast``).

The prompts are the harmless instructions that share the most harm-typical words with the SFT set's
harmful prompts (:mod:`nlsr.data.contrast`); the base model answers them itself, as it does the
helpful prompts, so the SFT learns that those words alone are no reason to refuse.
"""

from __future__ import annotations

from pathlib import Path

from nlsr.data.contrast import contrast_prompts, lexicon_of, log_odds, question_prompts
from nlsr.errors import NlsrError
from nlsr.experiment.stages.align import greedy_answers, real_answers, trim_line, trim_record, trimmed_answers
from nlsr.experiment.stages.common import load_base, read_jsonl, write_jsonl
from nlsr.io import write_json


def _word_contrast(section, pool: list[str], harmful: list[str]) -> tuple[list[dict], dict, str]:
    """The ``max`` / ``mean`` kinds: the prompts of ``pool`` that score highest against the SFT set's
    harmful prompts, what the data card records of the lexicon, and the line's tail."""
    odds = log_odds(harmful, pool)          # once: the lexicon and the mean score both read it
    lexicon = lexicon_of(odds, section.min_count)
    scores = lexicon if section.score == "max" else {w: v for w, (v, _) in odds.items()}
    picked = contrast_prompts(pool, scores, section.n, section.score)
    words = sorted(lexicon.items(), key=lambda item: -item[1])[:40]
    info = {"lexicon_size": len(lexicon), "top_words": [[w, round(s, 3)] for w, s in words],
            "lowest_score_taken": picked[-1]["score"] if picked else None}
    return picked, info, f"lexicon of {len(lexicon)} words"


def _question_contrast(ctx, section, pool: list[str]) -> tuple[list[dict], dict, str]:
    """The ``question`` kind: the first ``n`` prompts of ``pool`` recast as first-person questions;
    the recast questions are new text, so they pass the evaluation gate again."""
    from nlsr.experiment.stages.data import evaluation_gate

    gate = evaluation_gate(ctx.config, ctx.data_dir)
    picked = gate.filter("contrast", question_prompts(pool, len(pool)))[:section.n]
    if len(picked) < section.n:
        raise NlsrError(f"align.contrast.n = {section.n}, but only {len(picked)} of the {len(pool)} unused "
                        f"prompts of '{section.dataset}' can be recast as questions: lower align.contrast.n")
    return picked, {"gate": gate.lines()}, "recast as questions"


def run_contrast_answers(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Pick the contrast prompts from the harmless prompts no other set uses, let the base model
    answer them (greedy), trim them where the model ran on past its answer (``align.contrast.trim``)
    and keep the answers that are neither empty nor refusals."""
    from nlsr.experiment.stages.data import unused_harmless_prompts

    section = ctx.config.align.contrast
    pool = unused_harmless_prompts(ctx, inputs["data-align"], section.dataset)
    if section.score == "question":
        picked, info, tail = _question_contrast(ctx, section, pool)
        source = "instructions asking for a way or advice, recast as first-person questions (as_question)"
    else:
        harmful = [r["prompt"] for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
        picked, info, tail = _word_contrast(section, pool, harmful)
        source = "the prompts richest in harm-typical words (scored against sft.jsonl)"
    answers = greedy_answers(ctx, load_base(ctx), [r["prompt"] for r in picked], section.max_new_tokens,
                             section.batch_size, out / "contrast.cache.jsonl", "contrast answers")
    answers, trimmed = trimmed_answers(ctx, answers, section)
    rows, dropped = real_answers(picked, answers)
    count = write_jsonl(out / "contrast.jsonl", rows)
    card = {"contrast": {"rows": count, "picked": len(picked), "pool": len(pool), "dropped": dropped,
                         **trim_record(trimmed), **info},
            "sources": {"contrast": f"{section.dataset}: {source}, answered by the base model"}}
    write_json(out / "data_card.json", card)
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    return {"rows": count, "card": card,
            "line": f"{count} contrast answers of {len(picked)} prompts ({dropped['empty']} empty, "
                    f"{dropped['refusal']} refusals dropped){trim_line(trimmed)}; {tail}"}
