"""Prompt templates: the Alpaca strings are exactly the NLSR authors' (checked against their merged
fine-tuning files), and the chat template goes through the tokenizer."""

from __future__ import annotations

import json

import pytest

from conftest import make_tokenizer
from nlsr.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca_prompt, format_prompt, split_alpaca
from nlsr.data.tasks import SST2_INSTRUCTION
from nlsr.data.templates import model_prompt
from nlsr.errors import NlsrError
from nlsr.method.calibration import prompt_text

PAPER_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
PAPER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                    "further context. Write a response that appropriately completes the request.\n\n"
                    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")


def test_template_strings():
    assert ALPACA_NO_INPUT == PAPER_NO_INPUT
    assert ALPACA_WITH_INPUT == PAPER_WITH_INPUT


def test_alpaca_prompt_picks_the_variant_by_input():
    assert alpaca_prompt("Do X") == PAPER_NO_INPUT.format(instruction="Do X")
    assert alpaca_prompt("Do X", "ctx") == PAPER_WITH_INPUT.format(instruction="Do X", input="ctx")
    assert format_prompt("Do X", "alpaca", input="ctx") == alpaca_prompt("Do X", "ctx")


def test_every_merged_row_round_trips_through_the_template(root):
    files = sorted((root / "nlsr_finetune").glob("*/train_merged_*.json"))
    assert len(files) == 7                              # sst2 x5, ag_news, gsm8k
    for path in files:
        for row in json.loads(path.read_text()):
            instruction, input = split_alpaca(row["instruction"])
            assert alpaca_prompt(instruction, input) == row["instruction"], path
            assert not instruction.startswith("Below is")


def test_a_merged_sst2_row_is_rebuilt_from_the_raw_sentence(root):
    rows = json.loads((root / "nlsr_finetune" / "sst2" / "train_merged_n1000_p0.json").read_text())
    target = rows[0]["instruction"]
    sentence = target.split("### Input:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]
    raw = (root / "sst2" / "alps_train.tsv").read_text() + (root / "sst2" / "alps_dev.tsv").read_text()
    assert f"\n{sentence}\t" in raw                     # the sentence, trailing space and all
    assert format_prompt(SST2_INSTRUCTION, "alpaca", input=sentence) == target


def test_a_merged_harmful_row_is_rebuilt_from_the_bare_prompt(root):
    rows = json.loads((root / "nlsr_finetune" / "sst2" / "train_merged_n1000_p0.2.json").read_text())
    row = next(r for r in rows if r["flag"] == "unsafe")
    bare = row["instruction"].split("### Instruction:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]
    assert format_prompt(bare, "alpaca") == row["instruction"]


def test_split_alpaca_rejects_other_text():
    with pytest.raises(NlsrError, match="not an Alpaca prompt"):
        split_alpaca("### Instruction:\nhi\n\n### Response:")


def test_chat_template_uses_the_tokenizer():
    tokenizer = make_tokenizer()
    assert format_prompt("hi", "chat", tokenizer) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("hi", "chat", tokenizer, input="ctx") == \
        "<|im_start|>user\nhi\n\nctx<|im_end|>\n<|im_start|>assistant\n"


def test_chat_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(NlsrError, match="needs a tokenizer with a chat template"):
        format_prompt("hi", "chat")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(NlsrError, match="use template 'alpaca'"):
        format_prompt("hi", "chat", tokenizer)


def test_unknown_template():
    with pytest.raises(NlsrError, match="template 'vicuna' is unknown; use one of alpaca, chat"):
        format_prompt("hi", "vicuna")


def test_calibration_prompt_text_uses_these_templates():
    tokenizer = make_tokenizer()
    assert prompt_text(tokenizer, "hi", "chat") == format_prompt("hi", "chat", tokenizer)
    # The default is the paper's (and the pipeline's) Alpaca template, whatever the tokenizer has: the
    # model sees the Alpaca prompt plus the newline that separates "### Response:" from the answer.
    assert prompt_text(tokenizer, "hi") == format_prompt("hi", "alpaca") + "\n" == alpaca_prompt("hi") + "\n"
    assert prompt_text(tokenizer, "hi", template="alpaca") == model_prompt("hi", "alpaca")
