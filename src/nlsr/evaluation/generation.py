"""Batched greedy generation: left padding, KV cache, length-sorted batches, resumable.

The Hugging Face backend runs everywhere; the vLLM backend (:class:`VllmGenerator`) is what the
evaluate stage uses on a GPU machine where vLLM is installed (``evaluate.backend: auto | hf | vllm``;
it needs the model merged on disk). Both feed the same token ids and decode greedily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.progress import Counter


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
            try:
                record = json.loads(line)
                done[int(record["i"])] = str(record["output"])
            except (ValueError, KeyError, TypeError):
                continue            # a line torn by a kill (or blank): generate that prompt again
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    encoded = prompt_token_ids(tokenizer, prompts, max_prompt_tokens)
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: -len(encoded[i]))
    with Counter(len(prompts), description, done=len(done), unit="prompts") as bar:
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
            bar.advance(len(chunk))
    return [done[i] for i in range(len(prompts))]


def vllm_available() -> bool:
    """True on a CUDA machine with vLLM installed."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` where it can run (CUDA and vLLM installed), else ``hf``."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise NlsrError("evaluate.backend is 'vllm' but vLLM cannot run here (it needs a CUDA GPU and "
                        "`pip install vllm`); use backend 'auto' or 'hf'")
    if backend not in ("hf", "vllm"):
        raise NlsrError(f"unknown generation backend '{backend}'; use auto, hf or vllm")
    return backend


def prompt_token_ids(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """The token ids both backends feed the model: no special tokens added (the template already
    holds them), cut to the last ``max_prompt_tokens`` tokens."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]


class VllmGenerator:
    """Greedy generation with vLLM from a merged model directory: the same token ids, stop token,
    maximum new tokens and decoding as :func:`generate`; one engine serves several prompt sets."""

    def __init__(self, model_dir: Path, tokenizer, dtype: str = "bfloat16", seed: int = 0):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed)

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int = 1024) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True,
                                stop_token_ids=[self.tokenizer.eos_token_id])
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids(self.tokenizer, prompts, max_prompt_tokens)]
        outputs = self.llm.generate(requests, params)
        return [o.outputs[0].text.strip() for o in outputs]
