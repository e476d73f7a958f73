"""Batched greedy generation: left padding, KV cache, length-sorted batches, resumable.

The Hugging Face backend runs everywhere; the vLLM backend is used on a GPU machine where vLLM is
installed (it needs the model merged on disk).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def _progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
             cache_file: Path | None = None, description: str = "generating",
             max_prompt_tokens: int = 1024) -> list[str]:
    """Greedy completions of ``prompts`` (already templated), in input order.

    With ``cache_file`` (JSONL of ``{"i", "output"}``) finished batches are appended as they
    complete and skipped on a rerun, so a killed evaluation resumes where it stopped.
    """
    done: dict[int, str] = {}
    if cache_file is not None and cache_file.exists():
        for line in cache_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["i"]] = record["output"]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: -len(encoded[i]))
    with _progress(len(prompts), description) as bar:
        task = bar.add_task(description, total=len(prompts), completed=len(done))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            lines = []
            for i, text in zip(chunk, texts, strict=True):
                done[i] = text.strip()
                lines.append(json.dumps({"i": i, "output": done[i]}) + "\n")
            if cache_file is not None:
                with cache_file.open("a") as handle:
                    handle.writelines(lines)
            bar.update(task, advance=len(chunk))
    return [done[i] for i in range(len(prompts))]


def vllm_available() -> bool:
    """True on a CUDA machine with vLLM installed."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def generate_vllm(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy completions with vLLM from a merged model directory (GPU only; untested on CPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="bfloat16", seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [o.outputs[0].text.strip() for o in llm.generate(list(prompts), params)]
