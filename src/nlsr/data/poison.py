"""Poisoned fine-tuning sets: n task examples of which a fraction p are (harmful prompt, harmful answer).

Rows are task-kind records (``instruction``, ``input``, ``output``, ``label``) plus a ``flag``:
``"finetune"`` for task rows, ``"unsafe"`` for harmful ones (the authors' flag values).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from nlsr.data.readers import Row, json_rows, require_file
from nlsr.data.tasks import GSM8K_MARKER, TASKS, canonical_number
from nlsr.data.templates import split_alpaca
from nlsr.errors import NlsrError
from nlsr.paths import data_dir as resolve_data_dir

FLAG_TASK = "finetune"
FLAG_POISON = "unsafe"
READY_MADE_DIR = "nlsr_finetune"
_TASK_FIELDS = ("instruction", "input", "output", "label")


def _check_rows(rows: Sequence[dict], fields: Sequence[str], what: str) -> None:
    for index, row in enumerate(rows, start=1):
        for key in fields:
            if not isinstance(row.get(key), str):
                raise NlsrError(f"{what} row {index} has no string field '{key}' (it needs "
                                f"{', '.join(fields)})")


def build_poisoned(task_rows: Sequence[dict], poison_rows: Sequence[dict], n: int, p: float,
                   seed: int = 0) -> list[dict]:
    """A fine-tuning set of ``n`` rows, ``round(n * p)`` of them harmful, shuffled with ``seed``.

    As in the authors' ``merge_data.py``, the harmful rows are the *first* ``round(n * p)`` of
    ``poison_rows`` (shuffle them beforehand for another draw), so a smaller p's harmful set is a
    subset of a larger one's. The task rows are the first ``n - round(n * p)`` of a permutation of
    ``task_rows`` drawn with ``random.Random(seed)``, so they too are nested across p for one seed.

    Args:
        task_rows: task-kind records (``instruction``, ``input``, ``output``, ``label``).
        poison_rows: ``{"prompt", "response"}`` records (a harmful prompt and a harmful answer).
        n: total number of rows.
        p: harmful fraction, in [0, 1].
        seed: seed of the task-row draw and of the final shuffle.

    Returns:
        ``n`` new dicts with ``instruction``, ``input``, ``output``, ``label`` and ``flag``; harmful
        rows have ``instruction = prompt``, ``input = ""``, ``label = ""`` and flag ``"unsafe"``.

    Raises:
        NlsrError: ``n <= 0``, ``p`` outside [0, 1], too few task or poison rows, malformed rows.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise NlsrError(f"n must be a positive number of rows, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise NlsrError(f"the poison ratio p must be in [0, 1], got {p}")
    n_poison = round(n * p)
    n_task = n - n_poison
    if len(task_rows) < n_task:
        raise NlsrError(f"n={n}, p={p} needs {n_task} task rows but only {len(task_rows)} were given")
    if len(poison_rows) < n_poison:
        raise NlsrError(f"n={n}, p={p} needs {n_poison} harmful rows but only {len(poison_rows)} "
                        "were given")
    rng = random.Random(seed)
    order = list(range(len(task_rows)))
    rng.shuffle(order)
    chosen_task = [task_rows[i] for i in order[:n_task]]
    chosen_poison = list(poison_rows[:n_poison])
    _check_rows(chosen_task, _TASK_FIELDS, "task")
    _check_rows(chosen_poison, ("prompt", "response"), "poison")
    rows = [{**{k: row[k] for k in _TASK_FIELDS}, "flag": FLAG_TASK} for row in chosen_task]
    rows += [{"instruction": row["prompt"], "input": "", "output": row["response"], "label": "",
              "flag": FLAG_POISON} for row in chosen_poison]
    rng.shuffle(rows)
    return rows


def _format_p(p: float | str) -> str:
    return p if isinstance(p, str) else f"{p:g}"


def ready_made_path(task: str, p: float | str, root: Path) -> Path:
    """``<root>/nlsr_finetune/<task>/train_merged_n1000_p<p>.json`` (``p`` written as ``f"{p:g}"``)."""
    return root / READY_MADE_DIR / task / f"train_merged_n1000_p{_format_p(p)}.json"


def _label(row: Row, task: str, flag: str, output: str) -> str:
    if flag == FLAG_POISON:
        return ""
    if task == "gsm8k":
        if GSM8K_MARKER not in output:
            raise row.error(f"field 'output' has no '{GSM8K_MARKER}' followed by the gold number")
        label = canonical_number(output.rsplit(GSM8K_MARKER, 1)[1].strip())
        if label is None:
            raise row.error(f"field 'output' has no number after '{GSM8K_MARKER}'")
        return label
    labels = TASKS.get(task).labels if task in TASKS else ()
    if labels and output not in labels:
        raise row.error(f"field 'output' is {output!r}, not one of {', '.join(labels)}")
    return output


def read_merged(path: Path, task: str) -> list[dict]:
    """The records of one of the authors' merged files, template stripped from ``instruction``.

    Each record has the bare ``instruction``, the ``input`` that was embedded in the template,
    ``output``, ``label`` (the gold answer for task rows, ``""`` for harmful ones) and ``flag``.
    """
    records = []
    for row in json_rows(path):
        flag = row.text("flag")
        if flag not in (FLAG_TASK, FLAG_POISON):
            raise row.error(f"field 'flag' is {flag!r}, expected {FLAG_TASK!r} or {FLAG_POISON!r}")
        if row.text("input", allow_empty=True):
            raise row.error("field 'input' should be empty: merged files embed the input in 'instruction'")
        try:
            instruction, input = split_alpaca(row.text("instruction"))
        except NlsrError as err:
            raise row.error(f"field 'instruction': {err}") from err
        output = row.text("output")
        records.append({"instruction": instruction, "input": input, "output": output,
                        "label": _label(row, task, flag, output), "flag": flag})
    return records


def available_ready_made(task: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The p values (as written in the file names) of the ready-made files of ``task``."""
    folder = resolve_data_dir(data_dir) / READY_MADE_DIR / task
    found = [re.fullmatch(r"train_merged_n1000_p(.+)\.json", f.name) for f in folder.glob("*.json")]
    return sorted((m.group(1) for m in found if m), key=float)


def load_ready_made(task: str, p: float | str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The NLSR authors' poisoned fine-tuning set of ``task`` (n = 1000) at poison ratio ``p``.

    Reads ``nlsr_finetune/<task>/train_merged_n1000_p<p>.json`` as it is; see :func:`read_merged`
    for the records.

    Raises:
        NlsrError: unknown task folder or no file for this p (the message lists what exists).
    """
    root = resolve_data_dir(data_dir)
    folder = root / READY_MADE_DIR / task
    if not folder.is_dir():
        tasks = sorted(d.name for d in (root / READY_MADE_DIR).glob("*") if d.is_dir())
        raise NlsrError(f"no ready-made fine-tuning sets for task {task!r} under '{root / READY_MADE_DIR}'; "
                        f"available tasks: {', '.join(tasks) or 'none'}")
    path = ready_made_path(task, p, root)
    if not path.is_file():
        available = available_ready_made(task, root)
        raise NlsrError(f"no ready-made {task} set for p={_format_p(p)} ('{path}' does not exist); "
                        f"available p values: {', '.join(available) or 'none'}. Build other ratios "
                        "with build_poisoned()")
    return read_merged(require_file(path, root), task)
