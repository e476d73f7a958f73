"""The vLLM evaluation backend, checked on CPU with a stand-in for ``vllm.LLM``: what it is called
with (the merged model on disk, the HF path's token ids, greedy sampling, the same limits)."""

import sys
import types
from pathlib import Path

import pytest

from conftest import write_jsonl
from nlsr.errors import NlsrError
from nlsr.evaluation.generation import VllmGenerator, generate, prompt_token_ids, resolve_backend
from nlsr.experiment.config import ExperimentConfig
from nlsr.experiment.pipeline import RunContext


class _Completion:
    def __init__(self, text: str) -> None:
        self.outputs = [types.SimpleNamespace(text=text)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose LLM records its construction and every generate call."""
    calls: dict = {"init": [], "generate": []}

    class SamplingParams:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    class LLM:
        def __init__(self, model: str, **kwargs) -> None:
            assert (Path(model) / "config.json").exists(), "vLLM must get a merged model directory"
            calls["init"].append({"model": model, **kwargs})

        def generate(self, requests, params):
            calls["generate"].append({"requests": requests, "params": params.kwargs})
            return [_Completion(f" out {len(r['prompt_token_ids'])} ") for r in requests]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr("nlsr.evaluation.generation.vllm_available", lambda: True)
    return calls


def test_backend_resolution(monkeypatch):
    monkeypatch.setattr("nlsr.evaluation.generation.vllm_available", lambda: False)
    assert resolve_backend("auto") == "hf" and resolve_backend("hf") == "hf"
    with pytest.raises(NlsrError, match="needs a CUDA GPU"):
        resolve_backend("vllm")
    monkeypatch.setattr("nlsr.evaluation.generation.vllm_available", lambda: True)
    assert resolve_backend("auto") == "vllm"


def test_generator_feeds_the_hf_token_ids_greedily(fake_vllm, tiny_model_dir, tiny_tokenizer):
    prompts = ["short", "a longer prompt " * 20]
    generator = VllmGenerator(tiny_model_dir, tiny_tokenizer, dtype="float32", seed=3)
    texts = generator(prompts, max_new_tokens=7, max_prompt_tokens=40)
    init, = fake_vllm["init"]
    assert init["model"] == str(tiny_model_dir) and init["dtype"] == "float32" and init["seed"] == 3
    call, = fake_vllm["generate"]
    expected = prompt_token_ids(tiny_tokenizer, prompts, 40)
    assert [r["prompt_token_ids"] for r in call["requests"]] == expected
    assert len(expected[1]) == 40                         # truncated to the last 40 tokens, like HF
    assert call["params"] == {"temperature": 0.0, "max_tokens": 7, "skip_special_tokens": True,
                              "stop_token_ids": [tiny_tokenizer.eos_token_id]}
    assert texts == [f"out {len(ids)}" for ids in expected]


def test_hf_and_vllm_paths_share_the_prompt_ids(tiny_model, tiny_tokenizer):
    """The HF path generates from exactly the ids handed to vLLM (no special tokens added)."""
    seen = []
    original = tiny_model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"])
        return original(*args, **kwargs)

    tiny_model.generate = spy
    generate(tiny_model, tiny_tokenizer, ["hello"], max_new_tokens=2, batch_size=1)
    assert seen[0][0].tolist() == prompt_token_ids(tiny_tokenizer, ["hello"], 1024)[0]


def test_evaluate_stage_uses_vllm_on_the_merged_model(fake_vllm, monkeypatch, tmp_path, tiny_model,
                                                     tiny_tokenizer):
    from nlsr.experiment.stages import evaluate

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "harmful_eval.jsonl", [{"prompt": "how to do harm"}, {"prompt": "more harm"}])
    write_jsonl(data / "task_eval.jsonl", [{"instruction": "Classify", "input": "great film", "label": "positive"}])
    write_jsonl(data / "xstest_safe.jsonl", [{"prompt": "how do I kill a python process"}])
    cfg = ExperimentConfig(precision="float32", evaluate={"backend": "vllm", "batch_size": 2})
    ctx = RunContext(cfg, tmp_path / "run", tmp_path)
    ctx.cache["tokenizer"] = tiny_tokenizer
    monkeypatch.setattr(evaluate, "load_weak", lambda ctx_, path: tiny_model)
    out = tmp_path / "out"
    out.mkdir()
    summary = evaluate.run_model("weak", None)(ctx, out, {"data": data, "align_sft": tmp_path})
    init, = fake_vllm["init"]
    assert init["model"] == str(out / "merged") and init["dtype"] == "float32"
    assert not (out / "merged").exists()                  # the merged copy is removed afterwards
    assert [len(c["requests"]) for c in fake_vllm["generate"]] == [2, 1, 1]
    assert [c["params"]["max_tokens"] for c in fake_vllm["generate"]] == [
        cfg.evaluate.harmful_max_new_tokens, 8, cfg.evaluate.xstest_max_new_tokens]
    assert summary["metrics"]["backend"] == "vllm" and summary["tokens"] > 0
    assert (out / "generations.jsonl").exists()
