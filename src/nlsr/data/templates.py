"""Prompt templates: the paper's Alpaca template and the tokenizer's chat template.

Every stage (SFT, DPO, fine-tuning, calibration, generation) builds its prompts with
:func:`format_prompt`, so training and evaluation see the same text.

The Alpaca strings are the NLSR authors' exact ones: the ``instruction`` field of their merged
fine-tuning files (``nlsr_finetune/*/train_merged_*.json``) and the prompt of their harmful-score
script (``evaluation/poison/pred.py``) end in ``### Response:`` with **no** trailing newline, so
neither do these; the answer follows directly.
"""

from __future__ import annotations

from nlsr.errors import NlsrError

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
TEMPLATES = ("alpaca", "chat")

_NO_INPUT_HEAD, _NO_INPUT_TAIL = ALPACA_NO_INPUT.split("{instruction}")
_WITH_INPUT_HEAD, _WITH_INPUT_REST = ALPACA_WITH_INPUT.split("{instruction}")
_WITH_INPUT_MIDDLE, _WITH_INPUT_TAIL = _WITH_INPUT_REST.split("{input}")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the with-input variant when ``input`` is non-empty, else the no-input one."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def split_alpaca(text: str) -> tuple[str, str]:
    """Invert :func:`alpaca_prompt`: ``(instruction, input)`` of a fully templated prompt.

    ``alpaca_prompt(*split_alpaca(text)) == text`` for every prompt the template produced.

    Raises:
        NlsrError: ``text`` is not an Alpaca prompt.
    """
    if text.startswith(_WITH_INPUT_HEAD) and text.endswith(_WITH_INPUT_TAIL):
        body = text[len(_WITH_INPUT_HEAD):len(text) - len(_WITH_INPUT_TAIL)]
        instruction, sep, input = body.partition(_WITH_INPUT_MIDDLE)
        if sep:
            return instruction, input
    if text.startswith(_NO_INPUT_HEAD) and text.endswith(_NO_INPUT_TAIL):
        return text[len(_NO_INPUT_HEAD):len(text) - len(_NO_INPUT_TAIL)], ""
    raise NlsrError(f"text is not an Alpaca prompt (it should start with {_NO_INPUT_HEAD[:40]!r}... and "
                    f"end with '### Response:'): {text[:80]!r}")


def format_prompt(prompt: str, template: str = "alpaca", tokenizer=None, input: str = "") -> str:
    """The prompt as the model sees it before its answer.

    Args:
        prompt: the bare instruction (a harmful question, a task instruction).
        template: ``"alpaca"`` (the paper's format) or ``"chat"`` (the tokenizer's chat template, one
            user turn, ``add_generation_prompt=True``; a non-empty ``input`` is appended to the user
            message after a blank line).
        tokenizer: needed for ``"chat"`` only.
        input: the task input (SST-2 sentence, news article); ``""`` for none.

    Raises:
        NlsrError: unknown template, or ``"chat"`` without a tokenizer that has a chat template.
    """
    if template == "alpaca":
        return alpaca_prompt(prompt, input)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise NlsrError("template 'chat' needs a tokenizer with a chat template; this model has none, "
                            "use template 'alpaca'")
        content = f"{prompt}\n\n{input}" if input else prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise NlsrError(f"template {template!r} is unknown; use one of {', '.join(TEMPLATES)}")


def model_prompt(prompt: str, template: str = "alpaca", tokenizer=None, input: str = "") -> str:
    """The text the model is trained and evaluated on before its answer: :func:`format_prompt`
    plus, for Alpaca, the newline that separates ``### Response:`` from the answer."""
    text = format_prompt(prompt, template, tokenizer, input)
    return text + "\n" if template == "alpaca" else text
