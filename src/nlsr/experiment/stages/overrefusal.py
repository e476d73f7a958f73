"""DPO pairs mined from the weak model's over-refusals (``align.overrefusal``).

W_0 is probed on harmless prompts that no other set uses; where it refuses, the base model's answer
is preferred to W_0's own refusal. The stage sits between the SFT and the DPO: it needs W_0, and the
DPO adapter is where the pairs teach the model to answer again.
"""

from __future__ import annotations

from pathlib import Path

from nlsr.experiment.stages.align import greedy_answers, trim_line, trim_record, trimmed_answers
from nlsr.experiment.stages.common import load_base, load_weak, write_jsonl
from nlsr.io import write_json


def mined_pairs(prompts: list[str], chosen: list[str], rejected: list[str], is_refusal) -> tuple[list[dict], dict]:
    """The pairs ``(prompt, chosen, rejected)`` whose chosen answer is a real answer (not empty and
    not a refusal) and whose rejected answer is a refusal, with the count of each reason a pair was
    dropped."""
    pairs, dropped = [], {"chosen_empty": 0, "chosen_refusal": 0, "rejected_not_refusal": 0}
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        good = good.strip()
        if not good:
            dropped["chosen_empty"] += 1
        elif is_refusal(good):
            dropped["chosen_refusal"] += 1
        elif not is_refusal(bad):
            dropped["rejected_not_refusal"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad.strip()})
    return pairs, dropped


def run_overrefusal_pairs(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Probe W_0 on the pool, keep the prompts it refuses (at most ``max_pairs``), and pair the base
    model's answer (chosen; trimmed with ``align.overrefusal.trim``) with W_0's refusal (rejected)
    on each."""
    import gc

    from nlsr.evaluation.judges.refusal import is_refusal
    from nlsr.experiment.stages.data import overrefusal_pool

    section = ctx.config.align.overrefusal
    pool = overrefusal_pool(ctx, inputs["data-align"])
    weak = load_weak(ctx, inputs["align_sft"])
    def answers(model, prompts: list[str], max_new_tokens: int, name: str) -> list[str]:
        return greedy_answers(ctx, model, prompts, max_new_tokens, section.batch_size, out / f"{name}.cache.jsonl",
                              name) if prompts else []

    probe = answers(weak, pool, section.probe_max_new_tokens, "probe")
    all_refused = [p for p, answer in zip(pool, probe, strict=True) if is_refusal(answer)]
    refused = all_refused[:section.max_pairs]
    # Greedy decoding: the longer answer starts with the probe's tokens, so it is still the refusal.
    rejected = answers(weak, refused, section.max_new_tokens, "rejected")
    weak = None
    gc.collect()
    chosen = answers(load_base(ctx), refused, section.max_new_tokens, "chosen")
    chosen, trimmed = trimmed_answers(ctx, chosen, section)
    pairs, dropped = mined_pairs(refused, chosen, rejected, is_refusal)
    count = write_jsonl(out / "overrefusal_pairs.jsonl", pairs)
    card = {"overrefusal_pairs": {"rows": count, "probed": len(pool),
                                  "refused": len(all_refused), "mined": len(refused),
                                  "dropped": dropped, **trim_record(trimmed)},
            "sources": {"overrefusal_pairs": f"{section.dataset}: base model's answer (chosen) vs W_0's refusal "
                                             "(rejected), on the prompts W_0 refuses"}}
    write_json(out / "data_card.json", card)
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    info = card["overrefusal_pairs"]
    return {"rows": count, "card": card,
            "line": f"W_0 refused {info['refused']} of {len(pool)} harmless prompts; {count} pairs kept "
                    f"(of the first {len(refused)}){trim_line(trimmed)}"}
