"""The disjointness gate: no training-side row may share its prompt with an evaluation prompt.

Prompts are compared after :func:`normalise_prompt` (case, punctuation, spacing and quote styles
ignored), so a copy with another capitalisation or a trailing space still counts as the same prompt.
Overlapping rows are dropped *before* a set is sampled, so the sampled sizes stay what the config
asks for, and every drop is counted per pair of sets in the data card.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_prompt(text: str) -> str:
    """Lower-cased words of ``text`` joined by single spaces (punctuation and quote styles dropped)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


JUDGE_RESERVE_FRACTION = 0.3
JUDGE_RESERVE_SALT = "nlsr-judge-reserve-v1"
JUDGE_RESERVE = "judge_reserve"


def judge_reserved(prompt: str) -> bool:
    """True for the fixed ~30% of prompts (by a hash of the normalised text) kept for the in-project
    judge: the pipeline never trains on them, and the judge trains on nothing else from the data sets
    the pipeline draws from (SPARD, PKU), so the judge has never seen a row the pipeline trains on."""
    digest = hashlib.sha256(f"{JUDGE_RESERVE_SALT}:{normalise_prompt(prompt)}".encode()).hexdigest()
    return int(digest[:12], 16) / 16 ** 12 < JUDGE_RESERVE_FRACTION


def prompt_of(row: Mapping) -> str:
    """The prompt text of a record of any kind (``prompt``, or a task's ``instruction`` + ``input``)."""
    if "prompt" in row:
        return str(row["prompt"])
    return " ".join(str(row.get(k, "")) for k in ("instruction", "input")).strip()


def prompt_keys(rows: Iterable[Mapping], text: Callable[[Mapping], str] = prompt_of) -> set[str]:
    """The normalised prompts of ``rows`` (empty prompts are ignored)."""
    return {key for key in (normalise_prompt(text(r)) for r in rows) if key}


@dataclass
class Gate:
    """Named sets of normalised prompts that training-side rows must avoid, and the drops counted.

    ``counts[training_set][other_set]`` is how many rows of ``training_set`` were dropped because
    their prompt is in ``other_set`` (a row in several sets counts once per set)."""

    forbidden: dict[str, set[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    training: set[str] = field(default_factory=set)
    """Forbidden sets that are training-side (e.g. SFT prompts for the poison rows), not evaluation."""

    def add(self, name: str, rows: Iterable[Mapping], text: Callable[[Mapping], str] = prompt_of,
            training: bool = False) -> None:
        """Forbid the prompts of ``rows`` under ``name`` (merged with what is already there);
        ``training`` marks a training-side set (reported apart from the evaluation overlaps)."""
        self.forbidden.setdefault(name, set()).update(prompt_keys(rows, text))
        if training:
            self.training.add(name)

    def filter(self, training_set: str, rows: Sequence[Mapping], against: Sequence[str] | None = None,
               text: Callable[[Mapping], str] = prompt_of, judge_reserve: bool = False) -> list:
        """``rows`` without those whose prompt is in any of the ``against`` sets (default: all), in order.

        ``judge_reserve``: also drop the prompts kept for the judge (:func:`judge_reserved`)."""
        names = list(self.forbidden) if against is None else list(against)
        counts = self.counts.setdefault(training_set, {})
        kept = []
        for row in rows:
            key = normalise_prompt(text(row))
            hits = [n for n in names if key in self.forbidden.get(n, ())]
            if judge_reserve and judge_reserved(text(row)):
                hits.append(JUDGE_RESERVE)
            for n in hits:
                counts[n] = counts.get(n, 0) + 1
            if not hits:
                kept.append(row)
        counts["removed"] = counts.get("removed", 0) + len(rows) - len(kept)
        return kept

    def lines(self) -> list[str]:
        """One line per training-side set, as ``nlsr validate`` prints them."""
        out = []
        for name, counts in self.counts.items():
            removed = counts.get("removed", 0)
            detail = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "removed" and v)
            what = ("evaluation or training prompts" if any(k in self.training for k in counts)
                    else "evaluation prompts")
            if counts.get(JUDGE_RESERVE):
                what += " (or kept for the judge)"
            out.append(f"{name}: {removed} rows overlapping {what} removed" + (f" ({detail})" if detail else ""))
        return out


def overlap(a: Iterable[Mapping], b: Iterable[Mapping]) -> int:
    """How many normalised prompts two sets share (for checks and tests)."""
    return len(prompt_keys(a) & prompt_keys(b))


def evaluation_set_names(harmful_dataset: str) -> list[str]:
    """Every evaluation data set a training-side row is gated against: the main harmful set, every
    other registered harmful-prompt set (``harmful_*``), XSTest and every task's test set.

    Whole sets, and all of them whatever the config evaluates, so the alignment data (and the
    aligned model) are the same for every evaluation config and every fine-tuning task."""
    from nlsr.data.registry import list_datasets
    from nlsr.data.tasks import TASKS

    names = {harmful_dataset, "xstest"} | {TASKS.get(t).eval_dataset for t in TASKS}
    names |= {spec.name for spec in list_datasets() if spec.name.startswith("harmful_")}
    return sorted(names)
