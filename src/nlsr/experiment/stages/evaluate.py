"""Stage 6: generate on harmful prompts, task prompts and XSTest; score FA and over-refusal.

The harmful score needs a judge; judging happens in the report stage from the saved generations,
so that adding or improving a judge never regenerates anything.
"""

from __future__ import annotations

from pathlib import Path

from nlsr.data import accuracy, get_task
from nlsr.data.templates import model_prompt
from nlsr.evaluation.generation import generate, prompt_token_ids, resolve_backend
from nlsr.experiment.stages.common import load_base, load_model_dir, load_weak, read_jsonl, write_jsonl
from nlsr.io import write_json


def evaluate_model(ctx, model, out: Path, data_dir: Path, vllm=None) -> dict:
    """HS per judge on the harmful prompts, FA on the task, over-refusal on XSTest's safe prompts.

    ``vllm`` (a :class:`nlsr.evaluation.generation.VllmGenerator`) replaces the Hugging Face generation."""
    cfg, ev = ctx.config, ctx.config.evaluate
    tokenizer = ctx.tokenizer()
    task = get_task(cfg.attack.task)
    tokens = {"prompt": 0, "generated": 0}

    def run(name: str, prompts: list[str], max_new_tokens: int) -> list[str]:
        if vllm is not None:
            outputs = vllm(prompts, max_new_tokens)
        else:
            outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size=ev.batch_size,
                               cache_file=out / f"{name}.cache.jsonl", description=name)
        tokens["prompt"] += sum(len(ids) for ids in prompt_token_ids(tokenizer, prompts, 1024))
        tokens["generated"] += sum(min(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1, max_new_tokens)
                                   for o in outputs)
        return outputs

    harmful = read_jsonl(data_dir / "harmful_eval.jsonl")
    harmful_out = run("harmful", [model_prompt(r["prompt"], cfg.template, tokenizer) for r in harmful],
                      ev.harmful_max_new_tokens)
    extra_file = data_dir / "harmful_extra.jsonl"
    extra = read_jsonl(extra_file) if extra_file.exists() else []
    extra_out = run("harmful_extra", [model_prompt(r["prompt"], cfg.template, tokenizer) for r in extra],
                    ev.harmful_max_new_tokens) if extra else []
    task_rows = read_jsonl(data_dir / "task_eval.jsonl")
    task_out = run("task", [model_prompt(r["instruction"], cfg.template, tokenizer, r.get("input", ""))
                            for r in task_rows], task.max_new_tokens)
    xstest = read_jsonl(data_dir / "xstest_safe.jsonl")
    xstest_out = run("xstest", [model_prompt(r["prompt"], cfg.template, tokenizer) for r in xstest],
                     ev.xstest_max_new_tokens) if xstest else []

    from nlsr.evaluation.judges.refusal import is_refusal

    def percent(flags: list[bool]) -> float | None:
        return 100.0 * sum(flags) / len(flags) if flags else None

    correct = [task.scorer(o, r["label"]) for o, r in zip(task_out, task_rows, strict=True)]
    xs_refused = [is_refusal(o) for r, o in zip(xstest, xstest_out, strict=True) if r.get("split", "test") == "test"]
    metrics = {
        "harmful_refused": percent([is_refusal(o) for o in harmful_out]),
        "fa": 100.0 * accuracy(cfg.attack.task, task_out, [r["label"] for r in task_rows]),
        "xstest_refusal": percent(xs_refused),
        "task_refusal": percent([is_refusal(o) for o in task_out]),
        "n": {"harmful": len(harmful), "harmful_extra": len(extra), "task": len(task_rows), "xstest": len(xstest)},
        "task": cfg.attack.task,
        "tokens": tokens,
    }
    write_jsonl(out / "generations.jsonl",
                [{"set": "harmful", "split": r.get("split", "test"), "prompt": r["prompt"], "output": o}
                 for r, o in zip(harmful, harmful_out, strict=True)]
                + [{"set": "harmful_extra", "source": r["set"], "prompt": r["prompt"], "output": o}
                   for r, o in zip(extra, extra_out, strict=True)]
                + [{"set": "task", "split": r.get("split", "test"), "prompt": r["instruction"],
                    "input": r.get("input", ""), "label": r["label"], "output": o, "correct": c}
                   for r, o, c in zip(task_rows, task_out, correct, strict=True)]
                + [{"set": "xstest", "type": r.get("type", ""), "split": r.get("split", "test"), "prompt": r["prompt"],
                    "output": o}
                   for r, o in zip(xstest, xstest_out, strict=True)])
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    write_json(out / "metrics.json", metrics)
    return metrics


def cast_parameters(model, dtype) -> None:
    """Cast the weights only, as ``from_pretrained(dtype=...)`` does (buffers such as the rotary
    frequencies stay float32), and leave them flagged trainable as a freshly loaded model is.

    PEFT's merge leaves every weight with ``requires_grad=False``; for bf16 weights on a CPU that
    sends each linear layer down a slower path that keeps converted copies of the weights, about
    twice as slow and gigabytes larger (``benchmarks/bf16_generation_bench.py``). Generation runs under
    ``torch.inference_mode``, so no autograd graph is built either way."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.requires_grad_(True)


def run_model(base: str, adapter_stage: str | None):
    """A stage function evaluating ``adapter_stage``'s adapter on the weak model W_0 (``base='weak'``),
    the base model (``'base'``) or the merged aligned model W_a (``'merged'``, a fresh-LoRA attack),
    or ``adapter_stage``'s own model directory ``model/`` (``'model'``, a full fine-tune)."""
    if base not in ("weak", "base", "merged", "model"):
        raise ValueError(f"base must be weak, base, merged or model (got {base!r})")

    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        # Merge in float32, then generate in the run's precision.
        if base == "model":
            model = load_model_dir(ctx, inputs[adapter_stage] / "model")
        elif base == "merged":
            from nlsr.experiment.stages.anyfinetune import MERGED

            model = load_model_dir(ctx, inputs[MERGED] / "model")
        else:
            model = load_weak(ctx, inputs["align_sft"]) if base == "weak" else load_base(ctx)
        if adapter_stage is not None and base != "model":
            from nlsr.training.trainers import merge_adapter

            model = merge_adapter(model, inputs[adapter_stage] / "adapter")
        cast_parameters(model, ctx.precision.torch_dtype)
        model.eval()
        if resolve_backend(ctx.config.evaluate.backend) == "vllm":
            merged = out / "merged"
            model.save_pretrained(merged, safe_serialization=True)
            ctx.tokenizer().save_pretrained(merged)
            del model                      # vLLM takes most of the GPU's memory for itself
            metrics = _evaluate_with_vllm(ctx, merged, out, inputs["data"])
        else:
            metrics = evaluate_model(ctx, model, out, inputs["data"])
        hs = f"refused {metrics['harmful_refused']:.1f}% of harmful prompts"
        xs = f", XSTest refusal {metrics['xstest_refusal']:.1f}" if metrics["xstest_refusal"] is not None else ""
        return {"metrics": metrics, "tokens": metrics["tokens"]["prompt"] + metrics["tokens"]["generated"],
                "line": f"{hs}, FA {metrics['fa']:.1f}{xs}"}
    return run


def _evaluate_with_vllm(ctx, merged: Path, out: Path, data_dir: Path) -> dict:
    """Generate with vLLM from the merged model directory, then delete that copy."""
    import gc
    import shutil

    import torch

    from nlsr.evaluation.generation import VllmGenerator

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        generator = VllmGenerator(merged, ctx.tokenizer(), dtype=ctx.precision.dtype, seed=ctx.seed)
        metrics = evaluate_model(ctx, None, out, data_dir, vllm=generator)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    metrics["backend"] = "vllm"
    return metrics
