"""Moderation-model adapters, on tiny random Llamas whose weights force known outputs.

Both test models are "bigram" Llamas: one layer whose attention and MLP outputs are zeroed, so the
final hidden state is the (one-hot) embedding of the current token; the classification head or the
LM head then maps that token to chosen logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokenizer
from nlsr.errors import NlsrError
from nlsr.evaluation.judges import BeaverDamJudge, LlamaGuardJudge, make_judge

CATEGORIES = [f"category_{i}" for i in range(14)]


def _bigram_config(tokenizer, **extra):
    from transformers import LlamaConfig

    vocab = len(tokenizer)
    return LlamaConfig(vocab_size=vocab, hidden_size=vocab + vocab % 2, intermediate_size=4,
                       num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, **extra)


def _make_bigram(model) -> None:
    """Zero the layer outputs and make each token's embedding one-hot."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, : emb.shape[0]] = torch.eye(emb.shape[0])


@pytest.fixture(scope="module")
def beaverdam_dir(tmp_path_factory):
    """Category 3 fires (p ~ 0.83) iff the response's last character is '!'; all else p ~ 0.17."""
    from transformers import LlamaForSequenceClassification

    tokenizer = make_tokenizer()
    config = _bigram_config(tokenizer, num_labels=14, problem_type="multi_label_classification",
                            id2label=dict(enumerate(CATEGORIES)),
                            label2id={n: i for i, n in enumerate(CATEGORIES)})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    _make_bigram(model)
    with torch.no_grad():
        model.score.weight.fill_(-0.1)
        model.score.weight[3, tokenizer.convert_tokens_to_ids("!")] = 0.1
    path = tmp_path_factory.mktemp("beaverdam")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _guard_dir(tmp_path_factory, verdict: str):
    """A causal LM that answers ``verdict`` after the chat template's final newline."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_bigram_config(tokenizer)).eval()
    _make_bigram(model)
    chain = tokenizer.convert_ids_to_tokens(tokenizer("\n" + verdict, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        head = model.lm_head.weight
        head.zero_()
        for current, following in zip(chain, chain[1:], strict=False):
            head[tokenizer.convert_tokens_to_ids(following), tokenizer.convert_tokens_to_ids(current)] = 1.0
        head[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(chain[-1])] = 1.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp(f"guard-{verdict}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = ["How do I make a bomb?", "Tell me a joke", "How to steal?", "Hi"]
RESPONSES = ["Sure! Mix these!", "No.", "Here is a long and detailed plan, step by step!", "hello"]


def test_beaverdam_format_follows_the_beavertails_convention(beaverdam_dir):
    judge = make_judge("beaverdam", model=str(beaverdam_dir), device="cpu")
    assert isinstance(judge, BeaverDamJudge)
    assert judge.format("Q?", "A.") == "BEGINNING OF CONVERSATION: USER: Q? ASSISTANT:A.<|im_end|>"


def test_beaverdam_flags_any_category_over_threshold(beaverdam_dir):
    judge = make_judge("beaverdam", model=str(beaverdam_dir), device="cpu", batch_size=3)
    assert judge.judge(PROMPTS, RESPONSES) == [True, False, True, False]
    probs = judge.probabilities(PROMPTS, RESPONSES)
    assert probs.shape == (4, 14)
    assert probs[0, 3] > 0.8 and probs[1].max() < 0.2
    assert torch.allclose(probs[0, :3], probs[1, :3])     # other categories never fire
    cats = judge.categories(PROMPTS[:1], RESPONSES[:1])[0]
    assert list(cats) == CATEGORIES and cats["category_3"] > 0.5
    # padding in a batch does not change the scores
    alone = torch.cat([judge.probabilities([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    assert torch.allclose(alone, probs, atol=1e-5)
    # a stricter threshold flags nothing; empty input gives no flags
    strict = make_judge("beaverdam", model=str(beaverdam_dir), device="cpu", threshold=0.9)
    assert strict.judge(PROMPTS, RESPONSES) == [False] * 4
    assert judge.judge([], []) == []


def test_beaverdam_truncates_to_max_length(beaverdam_dir):
    judge = make_judge("beaverdam", model=str(beaverdam_dir), device="cpu", max_length=64)
    assert judge.judge(["q"], ["a" * 200 + "!"]) == [False]   # the '!' is cut off


def test_beaverdam_rejects_single_label_models(beaverdam_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(beaverdam_dir)
    model.config.problem_type = "single_label_classification"
    with pytest.raises(NlsrError, match="multi-label"):
        BeaverDamJudge(model, AutoTokenizer.from_pretrained(beaverdam_dir))


@pytest.mark.parametrize(("verdict", "flag"), [("unsafe", True), ("safe", False)])
def test_llamaguard_end_to_end_with_real_generation(tmp_path_factory, verdict, flag):
    path = _guard_dir(tmp_path_factory, verdict)
    judge = make_judge("llamaguard", model=str(path), device="cpu", batch_size=3)
    assert isinstance(judge, LlamaGuardJudge)
    assert judge.verdicts(PROMPTS, RESPONSES) == [verdict] * 4
    assert judge.judge(PROMPTS, RESPONSES) == [flag] * 4


def test_llamaguard_parses_only_the_generated_tokens(tmp_path_factory):
    judge = make_judge("llamaguard", model=str(_guard_dir(tmp_path_factory, "safe")), device="cpu",
                       batch_size=4)
    tok = judge.tokenizer
    assert judge.format("Q", "A").endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA"
                                           "<|im_end|>\n<|im_start|>assistant\n")
    seen = {}

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        seen["left_padded"] = bool(attention_mask[:, -1].all())
        seen["max_new_tokens"] = max_new_tokens
        answers = []
        for ids in input_ids:
            text = tok.decode(ids, skip_special_tokens=True)
            verdict = "  Unsafe\nS9" if "bomb" in text else ("unsure" if "joke" in text else "safe")
            answers.append(tok(verdict, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(map(len, answers))
        new = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
        return torch.cat([input_ids, new], dim=1)

    judge.model.generate = fake_generate
    # the word "unsafe" inside the prompt and the response must not count
    prompts = ["How do I make a bomb?", "Tell me a joke", "Is this unsafe?", "hi"]
    responses = ["Mix it.", "Why did ...", "It is unsafe, do not do it.", "unsafe"]
    assert judge.judge(prompts, responses) == [True, False, False, False]
    assert seen == {"left_padded": True, "max_new_tokens": 10}


def test_moderation_errors(tmp_path):
    with pytest.raises(NlsrError, match="does not exist"):
        make_judge("beaverdam", model=str(tmp_path / "missing"))
    with pytest.raises(NlsrError, match="no config.json"):
        make_judge("llamaguard", model=str(tmp_path))
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(NlsrError, match="chat template"):
        LlamaGuardJudge(model=None, tokenizer=tokenizer)
