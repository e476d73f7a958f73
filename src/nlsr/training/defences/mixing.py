"""VLGuard-style safety-data mixing: a fine-tuning-stage baseline.

Zong et al., 2024, "Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language Models"
(VLGuard) mix safety examples (harmful prompt -> refusal) into the user's fine-tuning data; the NLSR
paper uses this as a baseline with 10% safety data. Nothing changes in the optimiser: the mixed rows are
trained on with the ordinary SFT loss.

Convention used here: ``fraction`` is the share of safety rows **in the final, mixed set**; every task
row is kept and ``round(fraction * n_task / (1 - fraction))`` safety rows are *added on top*. With the
paper's 1000 task rows and ``fraction=0.1`` that is 111 safety rows (111 / 1111 = 9.99%); with 900 task
rows it is exactly 100 (100 / 1000 = 10%).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from nlsr.errors import NlsrError

FLAG_SAFETY = "safety"
FLAG_TASK_DEFAULT = "finetune"
TASK_FIELDS = ("instruction", "input", "output", "label")


def safety_count(n_task: int, fraction: float) -> int:
    """How many safety rows make up ``fraction`` of a set that also holds ``n_task`` task rows."""
    if not 0.0 <= fraction < 1.0:
        raise NlsrError(f"the safety fraction must be in [0, 1) (it is a share of the mixed set), got {fraction}")
    return round(fraction * n_task / (1.0 - fraction))


def safety_row(row: dict) -> dict:
    """A ``{"prompt", "response"}`` safety record as a task-schema row with flag ``"safety"``."""
    return {"instruction": row["prompt"], "input": "", "output": row["response"], "label": "", "flag": FLAG_SAFETY}


def mix_safety_rows(task_rows: Sequence[dict], safety_rows: Sequence[dict], fraction: float = 0.1,
                    seed: int = 0) -> list[dict]:
    """Task rows plus safety rows that make up ``fraction`` of the result, shuffled with ``seed``.

    Args:
        task_rows: the fine-tuning rows (``instruction``, ``input``, ``output``, ``label`` and optionally
            ``flag``, e.g. the output of :func:`nlsr.data.poison.build_poisoned`). All are kept, with
            their flag (``"finetune"`` when they have none).
        safety_rows: ``{"prompt", "response"}`` records (a harmful prompt and a refusal, e.g. the
            ``safety_sft`` registry set). The safety rows used are the first ``k`` of a permutation drawn
            with ``random.Random(seed)``; pass rows disjoint from any evaluation or calibration rows.
        fraction: share of safety rows in the **final** set, in [0, 1); ``k = round(fraction * n_task /
            (1 - fraction))`` rows are added on top of the task rows.
        seed: seed of the safety-row draw and of the final shuffle (one ``random.Random(seed)``).

    Returns:
        ``n_task + k`` new dicts with ``instruction``, ``input``, ``output``, ``label`` and ``flag``;
        safety rows have ``instruction = prompt``, ``input = ""``, ``label = ""`` and flag ``"safety"``.

    Raises:
        NlsrError: ``fraction`` outside [0, 1), no task rows, fewer than ``k`` safety rows, malformed rows.
    """
    k = safety_count(len(task_rows), fraction)
    if not task_rows:
        raise NlsrError("mix_safety_rows needs at least one task row")
    if len(safety_rows) < k:
        raise NlsrError(f"{len(task_rows)} task rows at safety fraction {fraction} need {k} safety rows but only "
                        f"{len(safety_rows)} were given")
    for index, row in enumerate(task_rows, start=1):
        missing = [key for key in TASK_FIELDS if not isinstance(row.get(key), str)]
        if missing:
            raise NlsrError(f"task row {index} has no string field(s) {', '.join(missing)} (it needs "
                            f"{', '.join(TASK_FIELDS)})")
    rng = random.Random(seed)
    order = list(range(len(safety_rows)))
    rng.shuffle(order)
    chosen = [safety_rows[i] for i in order[:k]]
    for index, row in enumerate(chosen, start=1):
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise NlsrError(f"safety row {index} of the draw needs string fields 'prompt' and 'response'")
    rows = [{**{key: row[key] for key in TASK_FIELDS}, "flag": row.get("flag", FLAG_TASK_DEFAULT)}
            for row in task_rows]
    rows += [safety_row(row) for row in chosen]
    rng.shuffle(rows)
    return rows
