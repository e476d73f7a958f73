"""Would one generation batch shared by several variants make the evaluate stages cheaper? PEFT's
mixed-adapter batches against one merged model per variant (what the evaluate stage does).

    python benchmarks/shared_batch_bench.py [--adapters 4] [--rows 32] [--max-new-tokens 48] [--repeats 2]

The embedded SmolLM2-135M-Instruct in the precision ``auto`` picks, torch's default threads, greedy.
``--adapters`` LoRA adapters (r = 16 on every linear module of every layer, random factors: the cost
of a step does not depend on their values) each answer the same ``--rows`` harmful prompts (Alpaca
template), as the variants of a controls run do:

* ``separate``: each adapter merged into its own copy of the model, ``--rows`` prompts in one batch
  per adapter (the evaluate stage: :func:`nlsr.evaluation.generation.generate`'s batch of 32);
* ``shared``: one PEFT model holding every adapter, all ``adapters x rows`` rows in one batch, each
  row routed to its adapter (``generate(adapter_names=...)``);
* ``bound``: the plain model at batch ``rows`` and at ``adapters x rows``: what a wider batch saves
  per row with no adapter overhead at all, the most sharing could gain.

Every row decodes exactly ``--max-new-tokens`` tokens (``min_new_tokens`` = max), so the three do the
same number of steps whatever the text. Methods alternate, ``--repeats`` times, the best counted;
the texts of ``separate`` and ``shared`` are compared row by row. Writes
``results/shared_batch_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import machine, templated_prompts, write_results
from peft import LoraConfig, get_peft_model

from nlsr.precision import resolve_precision
from nlsr.weights.models import load_model, load_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _generate(model, batch: dict, tokens: int, pad: int, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, **kwargs)
    return time.perf_counter() - start, out[:, batch["input_ids"].shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    precision = resolve_precision("auto").dtype
    tokenizer = load_tokenizer("smollm2")
    base = load_model("smollm2", precision="auto")
    prompts = templated_prompts("harmful_eval", args.rows, tokenizer)
    one = _batch(tokenizer, prompts)
    wide = _batch(tokenizer, prompts * args.adapters)
    names = [f"a{k}" for k in range(args.adapters)]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft_model = None
    merged = []
    for k, name in enumerate(names):
        torch.manual_seed(k)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        for module in peft_model.modules():          # small random updates: the text stays plausible
            if hasattr(module, "lora_B") and name in module.lora_B:
                module.lora_B[name].weight.data.mul_(0.01)
        single = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        single.load_state_dict(peft_model.state_dict(), strict=False)
        merged.append(single.merge_and_unload().eval())
    peft_model.eval()
    pad = tokenizer.pad_token_id
    routes = [name for name in names for _ in prompts]
    runs: dict[str, list[float]] = {"separate": [], "shared": [], "bound_narrow": [], "bound_wide": []}
    texts: dict[str, list] = {}
    for _ in range(args.repeats):
        total, outs = 0.0, []
        for model in merged:
            seconds, out = _generate(model, one, args.max_new_tokens, pad)
            total += seconds
            outs.extend(out.tolist())
        runs["separate"].append(total)
        texts["separate"] = outs
        seconds, out = _generate(peft_model, wide, args.max_new_tokens, pad, adapter_names=routes)
        runs["shared"].append(seconds)
        texts["shared"] = out.tolist()
        runs["bound_narrow"].append(args.adapters * _generate(base, one, args.max_new_tokens, pad)[0])
        runs["bound_wide"].append(_generate(base, wide, args.max_new_tokens, pad)[0])
    best = {k: min(v) for k, v in runs.items()}
    same = sum(a == b for a, b in zip(texts["separate"], texts["shared"], strict=True))
    rows = args.adapters * args.rows
    table = "\n".join([
        "| method | s for all rows (best) | s per row | vs separate |",
        "|---|---|---|---|",
        *(f"| {label} | {best[key]:.1f} | {best[key] / rows:.3f} | {best[key] / best['separate']:.2f} |"
          for key, label in [("separate", f"separate: one merged model per adapter, batch {args.rows}"),
                             ("shared", f"shared: PEFT mixed adapters, batch {rows}"),
                             ("bound_narrow", f"plain model, batch {args.rows} (x{args.adapters})"),
                             ("bound_wide", f"plain model, batch {rows}")]),
    ])
    notes = (f"\n\nSmolLM2-135M-Instruct, precision {precision}, {torch.get_num_threads()} torch threads, greedy, "
             f"{args.adapters} random LoRA adapters (r = 16, every linear module) x {args.rows} harmful prompts, "
             f"exactly {args.max_new_tokens} new tokens a row; each method {args.repeats} times, alternating, "
             f"the best counted (every run in the JSON). Same tokens in separate and shared: {same}/{rows} rows.")
    text = table + notes
    print(text)
    write_results("shared_batch_bench", {"machine": machine(), "args": vars(args), "runs_s": runs, "best_s": best,
                                         "same_tokens_rows": same, "rows": rows}, text)


if __name__ == "__main__":
    main()
