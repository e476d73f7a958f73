import torch

from nlsr.evaluation.generation import generate


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_tokenizer, tmp_path):
    prompts = ["a", "hello there", "a much longer prompt than the others"]
    batched = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(tiny_model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_generation_resumes_from_its_cache(tiny_model, tiny_tokenizer, tmp_path):
    prompts = ["one", "two", "three", "four"]
    cache = tmp_path / "cache.jsonl"
    full = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2, cache_file=cache)
    lines = cache.read_text().splitlines()
    assert len(lines) == 4
    cache.write_text("\n".join(lines[:2]) + "\n")          # as if killed after the first batch
    calls = []
    original = tiny_model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    tiny_model.generate = counting
    try:
        again = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2, cache_file=cache)
    finally:
        tiny_model.generate = original
    assert again == full and calls == [2]
    assert torch.is_grad_enabled()


def test_a_cache_line_torn_by_a_kill_is_regenerated_not_fatal(tiny_model, tiny_tokenizer, tmp_path):
    prompts = ["one", "two", "three"]
    cache = tmp_path / "cache.jsonl"
    full = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=3, batch_size=1, cache_file=cache)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])     # killed mid-write
    assert generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=3, batch_size=1, cache_file=cache) == full
