"""DPO pairs mined from the weak model's over-refusals (``align.overrefusal``).

W_0 is probed on harmless prompts that no other set uses; where it refuses, the base model's answer
is preferred to W_0's own refusal. The stage sits between the SFT and the DPO: it needs W_0, and the
DPO adapter is where the pairs teach the model to answer again.
"""

from __future__ import annotations

from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.io import write_json
from nlsr.stages.common import load_base, load_weak, write_jsonl


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


def _answers(ctx, model, prompts: list[str], max_new_tokens: int, out: Path, name: str) -> list[str]:
    from nlsr.generation import generate
    from nlsr.stages.evaluate import cast_parameters

    cfg = ctx.config
    tokenizer = ctx.tokenizer()
    cast_parameters(model, ctx.precision.torch_dtype)
    model.eval()
    return generate(model, tokenizer, [model_prompt(p, cfg.template, tokenizer) for p in prompts], max_new_tokens,
                    batch_size=cfg.align.overrefusal.batch_size, cache_file=out / f"{name}.cache.jsonl",
                    description=name)


def run_overrefusal_pairs(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Probe W_0 on the pool, keep the prompts it refuses (at most ``max_pairs``), and pair the base
    model's answer (chosen) with W_0's refusal (rejected) on each."""
    import gc

    from nlsr.judges.refusal import is_refusal
    from nlsr.stages.data import overrefusal_pool

    section = ctx.config.align.overrefusal
    pool = overrefusal_pool(ctx, inputs["data-align"])
    weak = load_weak(ctx, inputs["align_sft"])
    probe = _answers(ctx, weak, pool, section.probe_max_new_tokens, out, "probe")
    refused = [p for p, answer in zip(pool, probe, strict=True) if is_refusal(answer)][:section.max_pairs]
    # Greedy decoding: the longer answer starts with the probe's tokens, so it is still the refusal.
    rejected = _answers(ctx, weak, refused, section.max_new_tokens, out, "rejected") if refused else []
    weak = None
    gc.collect()
    chosen = _answers(ctx, load_base(ctx), refused, section.max_new_tokens, out, "chosen") if refused else []
    pairs, dropped = mined_pairs(refused, chosen, rejected, is_refusal)
    count = write_jsonl(out / "overrefusal_pairs.jsonl", pairs)
    card = {"overrefusal_pairs": {"rows": count, "probed": len(pool),
                                  "refused": sum(is_refusal(a) for a in probe), "mined": len(refused),
                                  "dropped": dropped},
            "sources": {"overrefusal_pairs": f"{section.dataset}: base model's answer (chosen) vs W_0's refusal "
                                             "(rejected), on the prompts W_0 refuses"}}
    write_json(out / "data_card.json", card)
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    info = card["overrefusal_pairs"]
    return {"rows": count, "card": card,
            "line": f"W_0 refused {info['refused']} of {len(pool)} harmless prompts; {count} pairs kept "
                    f"(of the first {len(refused)})"}
