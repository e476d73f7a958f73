"""Downstream tasks and their fine-tuning accuracy (FA) scorers, as in the paper's evaluation.

- SST-2: correct if the output contains the gold label word (``positive`` / ``negative``),
  case-insensitively.
- AG News: correct if the output contains the gold class name (World, Sports, Business, Sci/Tech),
  case-insensitively. The paper's rule is a plain "contains", so an output that names several
  classes counts as correct when one of them is the gold class (the rule the Vaccine/Lisa line of
  work uses, ``label in output``). ``strict=True`` counts such outputs wrong instead (for SST-2 too:
  an output with both label words is then wrong).
- GSM8K: the first number after ``The final answer is:`` (else the last number in the text), with
  ``$`` and thousands commas removed, compared numerically with the gold number (``18.0 == 18``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from nlsr.errors import NlsrError
from nlsr.registry import Registry

SST2_LABELS = ("negative", "positive")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_MARKER = "The final answer is:"
# The instruction wording of the NLSR authors' fine-tuning files (nlsr_finetune/*/train_merged_*.json).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AG_NEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                       "World\nSports\nBusiness\nSci/Tech\n")
# GSM8K has no separate instruction: the question followed by this suffix is the instruction, and
# the answer's "####" is replaced by "The final answer is: " (nlsr_finetune/gsm8k/test.json).
GSM8K_SUFFIX = "\nFirst think step by step and then answer the final number.\n"

_MARKER_RE = re.compile(r"the final answer is\s*:", re.IGNORECASE)
# A number not glued to a word or another number: optional sign and "$", digits with thousands
# commas, optional decimals. "16-3" yields 16 and 3 (the "-" follows a digit, so it is no sign).
_NUMBER_RE = re.compile(r"(?<![\w.,$])(-?)\$?(\d[\d,]*(?:\.\d+)?|\.\d+)")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def canonical_number(text: str) -> str | None:
    """``text`` as a canonical number string (``"$1,000.50"`` -> ``"1000.5"``, ``"18.0"`` -> ``"18"``),
    or None if it is not a number."""
    cleaned = text.translate(_MINUS_SIGNS).replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")



def gsm8k_record(question: str, answer: str) -> dict | None:
    """A GSM8K problem in the authors' format: instruction = question + :data:`GSM8K_SUFFIX`,
    ``####`` -> ``The final answer is: ``, label = the gold number; None without a ``####`` number."""
    gold = canonical_number(answer.rsplit("####", 1)[1]) if "####" in answer else None
    if gold is None:
        return None
    return {"instruction": question + GSM8K_SUFFIX, "input": "",
            "output": answer.replace("####", GSM8K_MARKER + " "), "label": gold}

def _numbers(text: str) -> list[str]:
    return [sign + digits for sign, digits in _NUMBER_RE.findall(text.translate(_MINUS_SIGNS))]


def extract_gsm8k_answer(text: str) -> str | None:
    """The predicted GSM8K answer of a generated text, canonical (see :func:`canonical_number`).

    The first number after the first ``The final answer is:`` (case-insensitive, colon required:
    one GSM8K solution says "the final answer is 15 gallons * 8 = 120" before its real marker); if
    there is no such marker or no number after it, the last number in the text; None if there is
    no number. The first marker wins because a model that runs on past its answer tends to invent
    a new problem with its own marker.
    """
    marker = _MARKER_RE.search(text)
    if marker is not None:
        after = _numbers(text[marker.end():])
        if after:
            return canonical_number(after[0])
    numbers = _numbers(text)
    return canonical_number(numbers[-1]) if numbers else None


def _contains_class(output: str, label: str, classes: Sequence[str], strict: bool) -> bool:
    lowered = output.lower()
    if label.lower() not in lowered:
        return False
    if strict:
        return not any(c.lower() in lowered for c in classes if c.lower() != label.lower())
    return True


def first_label(output: str, classes: Sequence[str]) -> str | None:
    """The class whose name comes first in ``output`` as a whole word (case-insensitive), or None:
    what a classification answer predicts, for diagnostics such as the label prior of a model."""
    hits = [(m.start(), c) for c in classes
            for m in [re.search(rf"\b{re.escape(c.lower())}\b", output.lower())] if m]
    return min(hits)[1] if hits else None


def _check_label(task: str, label: str, classes: Sequence[str]) -> None:
    if label.lower() not in {c.lower() for c in classes}:
        raise NlsrError(f"{task} label {label!r} is not one of {', '.join(classes)}")


def score_sst2(output: str, label: str, strict: bool = False) -> bool:
    """SST-2: the output contains the gold label word."""
    _check_label("sst2", label, SST2_LABELS)
    return _contains_class(output, label, SST2_LABELS, strict)


def score_ag_news(output: str, label: str, strict: bool = False) -> bool:
    """AG News: the output contains the gold class name."""
    _check_label("ag_news", label, AG_NEWS_LABELS)
    return _contains_class(output, label, AG_NEWS_LABELS, strict)


def score_gsm8k(output: str, label: str, strict: bool = False) -> bool:
    """GSM8K: the extracted answer equals the gold number (``strict`` has no effect)."""
    gold = canonical_number(label)
    if gold is None:
        raise NlsrError(f"gsm8k label {label!r} is not a number")
    return extract_gsm8k_answer(output) == gold


Scorer = Callable[..., bool]


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task: its data sets (names in the data registry), decoding budget and scorer.

    ``instruction`` is the fixed instruction of classification tasks (the example goes in the
    Alpaca ``input``); it is ``""`` for GSM8K, whose instruction is the question itself.
    """

    name: str
    train_dataset: str
    eval_dataset: str
    max_new_tokens: int
    scorer: Scorer
    labels: tuple[str, ...] = field(default=())
    instruction: str = ""
    description: str = ""


TASKS: Registry[TaskSpec] = Registry("task")
for _spec in (
    TaskSpec("sst2", "sst2_train", "sst2_eval", max_new_tokens=8, scorer=score_sst2,
             labels=SST2_LABELS, instruction=SST2_INSTRUCTION,
             description="SST-2 sentiment (GLUE), 872 validation sentences"),
    TaskSpec("ag_news", "ag_news_train", "ag_news_eval", max_new_tokens=16,
             scorer=score_ag_news, labels=AG_NEWS_LABELS, instruction=AG_NEWS_INSTRUCTION,
             description="AG News topic, 4 classes, 7,600 test articles"),
    TaskSpec("gsm8k", "gsm8k_train", "gsm8k_eval", max_new_tokens=256, scorer=score_gsm8k,
             description="GSM8K grade-school math, 1,319 test problems"),
):
    TASKS.register(_spec.name, summary=_spec.description)(_spec)


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name is an error that suggests close matches."""
    return TASKS.get(name)


def is_correct(task: str, output: str, label: str, strict: bool = False) -> bool:
    """Whether one generated ``output`` is correct for gold ``label`` under ``task``'s rule."""
    return get_task(task).scorer(output, label, strict=strict)


def accuracy(task: str, outputs: Sequence[str], labels: Sequence[str], strict: bool = False) -> float:
    """The share of ``outputs`` that are correct (FA, in [0, 1]).

    Raises:
        NlsrError: unknown task, different numbers of outputs and labels, or no outputs.
    """
    spec = get_task(task)
    if len(outputs) != len(labels):
        raise NlsrError(f"accuracy needs one label per output: got {len(outputs)} outputs and "
                        f"{len(labels)} labels")
    if not outputs:
        raise NlsrError("accuracy of no outputs is undefined; give at least one")
    correct = sum(spec.scorer(o, lab, strict=strict) for o, lab in zip(outputs, labels, strict=True))
    return correct / len(outputs)
