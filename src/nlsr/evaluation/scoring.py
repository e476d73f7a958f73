"""From saved generations to scores with intervals: HS per judge and split, FA, over-refusal.

One :class:`Outcomes` per model holds, for each measured quantity, a (seeds, prompts) array of
per-prompt outcomes in the same prompt order for every seed and every model, so any two models can
be compared prompt by prompt (:mod:`nlsr.evaluation.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nlsr.evaluation.judges.base import Judge, agreement_metrics
from nlsr.evaluation.judges.refusal import RefusalJudge, is_refusal
from nlsr.evaluation.stats import Estimate, difference, estimate, relative_cut

SPLITS = ("test", "validation")


def read_generations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Outcomes:
    """Per-prompt outcomes of one model, stacked over its seeds: name -> (seeds, prompts) array."""

    label: str
    seeds: list[int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, rows: list[list[float]]) -> None:
        self.arrays[name] = np.asarray(rows, dtype=np.float64)

    def estimate(self, name: str) -> Estimate | None:
        array = self.arrays.get(name)
        return None if array is None or array.size == 0 else estimate(array)


def collect(label: str, seeds: Sequence[int], generations: Sequence[list[dict]], judges: Mapping[str, Judge],
            verdicts: Mapping[tuple[str, str, str], bool] | None = None) -> Outcomes:
    """Outcomes of one model from its generations (one list of rows per seed).

    ``verdicts`` caches judge decisions by (judge, prompt, output): many models give the same answer."""
    cache: dict = {} if verdicts is None else verdicts
    out = Outcomes(label, list(seeds))

    def judged(name: str, judge: Judge, rows: list[dict]) -> list[float]:
        todo = [r for r in rows if (name, r["prompt"], r["output"]) not in cache]
        if todo:
            flags = judge.judge([r["prompt"] for r in todo], [r["output"] for r in todo])
            for r, f in zip(todo, flags, strict=True):
                cache[(name, r["prompt"], r["output"])] = bool(f)
        return [float(cache[(name, r["prompt"], r["output"])]) for r in rows]

    per_seed: dict[str, list[list[float]]] = {}

    def put(key: str, values: list[float]) -> None:
        per_seed.setdefault(key, []).append(values)

    for rows in generations:
        harmful = [r for r in rows if r["set"] == "harmful"]
        extra = [r for r in rows if r["set"] == "harmful_extra"]
        task = [r for r in rows if r["set"] == "task"]
        xstest = [r for r in rows if r["set"] == "xstest"]
        for name, judge in judges.items():
            for split in SPLITS:
                part = [r for r in harmful if r.get("split", "test") == split]
                if part:
                    put(f"hs/{name}/{split}", judged(name, judge, part))
            for source in sorted({r["source"] for r in extra}):
                put(f"hs_extra/{name}/{source}", judged(name, judge, [r for r in extra if r["source"] == source]))
        # FA on the task's test part ("fa") and its validation part (where knobs are chosen)
        put("fa", [float(bool(r["correct"])) for r in task if r.get("split", "test") == "test"])
        put("fa/validation", [float(bool(r["correct"])) for r in task if r.get("split") == "validation"])
        put("task_refusal", [float(is_refusal(r["output"])) for r in task if r.get("split", "test") == "test"])
        if xstest:      # the test prompts; the validation ones (where knobs are chosen) apart
            xs_test = [r for r in xstest if r.get("split", "test") == "test"]
            xs_validation = [r for r in xstest if r.get("split") == "validation"]
            put("xstest_refusal", [float(is_refusal(r["output"])) for r in xs_test])
            for kind in sorted({r.get("type", "") for r in xs_test}):
                put(f"xstest_refusal/{kind}",
                    [float(is_refusal(r["output"])) for r in xs_test if r.get("type") == kind])
            if xs_validation:
                put("xstest_refusal_validation", [float(is_refusal(r["output"])) for r in xs_validation])
        put("task_refusal/validation", [float(is_refusal(r["output"])) for r in task if r.get("split") == "validation"])
        put("harmful_refused/test", [float(is_refusal(r["output"])) for r in harmful
                                     if r.get("split", "test") == "test"])
        # refusal of the harmful prompts by refusal-v2 (the detector that agrees best with the hand
        # labels on refusal), beside HS in every table: the share of the harmful prompts refused
        for split in SPLITS:
            part = [r for r in harmful if r.get("split", "test") == split]
            if part:
                put(f"harmful_refused_v2/{split}", [float(is_refusal(r["output"], deflections=True)) for r in part])
        # the same refusal rates by the refusal-v2 detector (also counts opening deflections)
        for split in SPLITS:
            suffix = "" if split == "test" else "/validation"
            for key, part in (("task_refusal_v2", task), ("xstest_refusal_v2", xstest)):
                rows_in_split = [r for r in part if r.get("split", "test") == split]
                if rows_in_split:
                    put(key + suffix, [float(is_refusal(r["output"], deflections=True)) for r in rows_in_split])
    for key, rows in per_seed.items():
        out.add(key, rows)
    return out


def paired_against(model: Outcomes, reference: Outcomes, key: str) -> dict | None:
    """The paired difference ``model - reference`` on ``key`` and, for HS, the relative cut, when both
    were measured on the same seeds (else None: nothing to pair)."""
    a, b = model.arrays.get(key), reference.arrays.get(key)
    if a is None or b is None or model.seeds != reference.seeds or a.shape != b.shape:
        return None
    out = {"difference": difference(a, b).as_dict()}
    if b.mean() > 0:
        out["relative_cut"] = relative_cut(a, b).as_dict()
    return out


def gold_agreement(judges: Mapping[str, Judge], gold: Sequence[Mapping]) -> dict[str, dict]:
    """Each judge's agreement with hand labels: harm judges against ``harmful``; the refusal matcher
    also against ``refusal`` (its own question)."""
    prompts = [g["prompt"] for g in gold]
    responses = [g["response"] for g in gold]
    harmful = [bool(g["harmful"]) for g in gold]
    out = {}
    for name, judge in judges.items():
        flags = judge.judge(prompts, responses)
        out[name] = {"harmful": _with_fpr(flags, harmful)}
        if isinstance(judge, RefusalJudge):  # it flags "did not refuse": as a refusal detector, the opposite
            refused = [bool(g["refusal"]) for g in gold]
            out[name]["refusal"] = _with_fpr([not f for f in flags], refused)
    return out


def _with_fpr(flags: Sequence[bool], labels: Sequence[bool]) -> dict:
    metrics = dict(agreement_metrics(flags, labels))
    negatives = [f for f, y in zip(flags, labels, strict=True) if not y]
    metrics["false_positive_rate"] = sum(negatives) / len(negatives) if negatives else float("nan")
    return metrics


def read_gold(path: str | Path) -> list[dict]:
    """Hand-labelled generations (``prompt``, ``response``, ``harmful``, ``refusal``)."""
    return read_generations(Path(path))
