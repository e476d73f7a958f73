"""Labelled responses for training and measuring the ``trained`` judge: reading and splitting.

Labelled responses are read directly from the offline data folder:

* ``jailbreakbench`` (trained on): ``jailbreakbench/*.json`` records (``goal`` as the prompt,
  ``response``, ``jailbroken`` as the label); records without a response are skipped.
* ``spard`` (trained on): ``beavertails_derived_spard/train_beaverTails_train.jsonl``: each
  ``prompt`` with its ``safe`` refusal (not harmful) and its BeaverTails ``unsafe`` answer (harmful).
* ``pku_safe`` (trained on): ``pku_saferlhf_derived/pku_safe_sft.json``, the safe responses of
  PKU-SafeRLHF (all not harmful): short refusals and plain answers in the same (Alpaca-7B) style
  as the BeaverTails ``unsafe`` answers, so the classifier cannot tell the labels apart by style.
* ``stl_safe`` (validation and test only): ``safety_tuned_llamas/safety_only_data_Instructions.json``,
  safe answers to mostly harmful instructions from another source (all not harmful): an
  out-of-distribution false-positive check. (Training on its train split was measured: it did not
  help the other sources, and the check would no longer be out of distribution.)
* ``spard_eval`` (test only): ``beavertails_derived_spard/eval_beaverTails_test.jsonl`` pairs, the
  HS prompts (disjoint from the SPARD train file).
* ``<source>_short`` (augmentation, same role as ``<source>``): a truncated copy of every response
  above (its first sentences, at most :data:`SHORT_MAX_CHARS` characters) with the same label, so
  that length stops predicting the label; a harmful truncation that reads as a refusal (a refusal
  phrase, see :mod:`nlsr.evaluation.judges.refusal`) is dropped.

Not used: the ``chosen`` answers of ``pku_saferlhf_derived/pku_seferlhf_realign_dpo_5k.json`` are
only the *better* of two answers, and many are plainly harmful (the best poison for a dog, how long
pigs take to dispose of a body), so they are no harmless labels; nor are the ``rejected`` ones
harmful labels.

Rows are split **by prompt** into train / validation / test (70/15/15): a row's split is a seeded
hash of its prompt group (the normalised prompt; for JailbreakBench the behaviour index, which joins
reworded goals; groups sharing a prompt are merged), so both answers of a SPARD pair, all
responses to one goal and the truncated copies of a response share a split, and a row's split does
not depend on which other rows are loaded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nlsr.errors import NlsrError

JBB_DIR = "jailbreakbench"
SPARD_TRAIN = "beavertails_derived_spard/train_beaverTails_train.jsonl"
SPARD_EVAL = "beavertails_derived_spard/eval_beaverTails_test.jsonl"
STL_SAFE = "safety_tuned_llamas/safety_only_data_Instructions.json"
PKU_SAFE = "pku_saferlhf_derived/pku_safe_sft.json"
SHORT = "_short"
BASE_SOURCES = ("jailbreakbench", "spard", "pku_safe", "stl_safe", "spard_eval")
SOURCES = BASE_SOURCES + tuple(s + SHORT for s in BASE_SOURCES)
TRAIN_SOURCES = tuple(s + suffix for suffix in ("", SHORT) for s in ("jailbreakbench", "spard", "pku_safe"))
TEST_ONLY_SOURCES = ("spard_eval", "spard_eval" + SHORT)
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.7, 0.15, 0.15)
SHORT_MIN_CHARS = 30
SHORT_MAX_CHARS = 120

Row = dict[str, Any]


def normalise_prompt(text: str) -> str:
    """The prompt identity used for splitting: lower case, single spaces."""
    return re.sub(r"\s+", " ", text.strip().lower())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise NlsrError(f"labelled data file '{path}' is missing; point --data-dir at the offline "
                        "data folder (shared/data)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise NlsrError(f"'{path}' is not valid JSONL: {err}") from None


def _spard_rows(path: Path, source: str) -> list[Row]:
    rows = []
    for i, record in enumerate(_read_jsonl(path)):
        if not all(isinstance(record.get(k), str) for k in ("prompt", "safe", "unsafe")):
            raise NlsrError(f"{path} line {i + 1} lacks string fields 'prompt', 'safe', 'unsafe'")
        group = f"prompt:{normalise_prompt(record['prompt'])}"
        for key, harmful in (("safe", False), ("unsafe", True)):
            rows.append({"prompt": record["prompt"], "response": record[key], "harmful": harmful,
                         "source": source, "group": group})
    return rows


def _jbb_rows(folder: Path) -> list[Row]:
    files = sorted(glob.glob(str(folder / "*.json")))
    if not files:
        raise NlsrError(f"no JailbreakBench files (*.json) in '{folder}'; point --data-dir at the "
                        "offline data folder (shared/data)")
    rows = []
    for name in files:
        try:
            records = json.loads(Path(name).read_text())["jailbreaks"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise NlsrError(f"'{name}' is not a JailbreakBench artifact file: {err}") from None
        for record in records:
            if not isinstance(record.get("response"), str) or record.get("jailbroken") is None:
                continue
            rows.append({"prompt": record["goal"], "response": record["response"],
                         "harmful": bool(record["jailbroken"]), "source": "jailbreakbench",
                         "group": f"jbb:{record['index']}"})
    return rows


def _merge_groups(rows: list[Row]) -> None:
    """Join groups that share a normalised prompt; each row's group becomes its component's min key."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for row in rows:
        a, b = find(row["group"]), find(f"prompt:{normalise_prompt(row['prompt'])}")
        if a != b:
            parent[max(a, b)] = min(a, b)
    for row in rows:
        row["group"] = find(row["group"])


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()
    return int(digest[:13], 16) / 16 ** 13


def split_of(group: str, seed: int = 0, fractions: Sequence[float] = FRACTIONS) -> str:
    """The split (train / validation / test) of a prompt group: a seeded hash, stable per group."""
    u, edge = _unit(seed, group), 0.0
    for name, share in zip(SPLITS, fractions, strict=True):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def _limit(rows: list[Row], max_prompts: int | None, seed: int) -> list[Row]:
    """Keep the rows of at most ``max_prompts`` groups per source (a seeded, stable choice)."""
    if max_prompts is None:
        return rows
    keep: set[tuple[str, str]] = set()
    for source in sorted({r["source"] for r in rows}):
        groups = sorted({r["group"] for r in rows if r["source"] == source},
                        key=lambda g: _unit(seed + 1, g))
        keep.update((source, g) for g in groups[:max_prompts])
    return [r for r in rows if (r["source"], r["group"]) in keep]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise NlsrError(f"labelled data file '{path}' is missing; point --data-dir at the offline "
                        "data folder (shared/data)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NlsrError(f"'{path}' is not valid JSON: {err}") from None


def _stl_rows(path: Path) -> list[Row]:
    rows = []
    for record in _read_json(path):
        prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        rows.append({"prompt": prompt, "response": record["output"], "harmful": False,
                     "source": "stl_safe", "group": f"prompt:{normalise_prompt(prompt)}"})
    return rows


def _pku_rows(path: Path) -> list[Row]:
    rows = []
    for i, record in enumerate(_read_json(path)):
        if not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            raise NlsrError(f"{path} record {i} lacks string fields 'prompt', 'response'")
        rows.append({"prompt": record["prompt"], "response": record["response"], "harmful": False,
                     "source": "pku_safe", "group": f"prompt:{normalise_prompt(record['prompt'])}"})
    return rows


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def truncate(text: str, min_chars: int = SHORT_MIN_CHARS, max_chars: int = SHORT_MAX_CHARS) -> str:
    """The first sentences of ``text`` (until ``min_chars`` are reached), cut to at most
    ``max_chars`` characters at a word boundary."""
    out = ""
    for sentence in _SENTENCE_END.split(text.strip()):
        out = f"{out} {sentence}".strip()
        if len(out) >= min_chars:
            break
    if len(out) > max_chars:
        cut = out[:max_chars].rsplit(" ", 1)[0]
        out = cut if len(cut) >= min_chars else out[:max_chars]
    return out


def short_copies(rows: Iterable[Row]) -> list[Row]:
    """Truncated copies (source ``<source>_short``) of the responses, same label and prompt group.

    Copies that are not shorter than the response by more than 5 characters are skipped, and so
    are harmful copies that read as a refusal: the truncation may cut before the harmful part.
    """
    from nlsr.evaluation.judges.refusal import is_refusal

    out = []
    for row in rows:
        short = truncate(row["response"])
        if not short or len(short) >= len(row["response"].strip()) - 5:
            continue
        if row["harmful"] and is_refusal(short):
            continue
        out.append(dict(row, response=short, source=row["source"] + SHORT))
    return out


def load_labelled_rows(data_dir: str | os.PathLike | None = None,
                       max_prompts: int | None = None, seed: int = 0) -> list[Row]:
    """Labelled rows ``{prompt, response, harmful, source, group}`` of every source.

    Sources: ``jailbreakbench``, ``spard`` and ``pku_safe`` (trained on), ``stl_safe``
    (validation and test only), ``spard_eval`` (test only), and the truncated ``<source>_short``
    copies of each. ``max_prompts`` keeps at most that many prompt groups per source (for quick
    runs); the truncated copies follow the rows kept.
    """
    from nlsr.paths import data_dir as resolve

    root = resolve(data_dir)
    rows = (_jbb_rows(root / JBB_DIR) + _spard_rows(root / SPARD_TRAIN, "spard")
            + _stl_rows(root / STL_SAFE) + _pku_rows(root / PKU_SAFE)
            + _spard_rows(root / SPARD_EVAL, "spard_eval"))
    _merge_groups(rows)
    rows = _limit(rows, max_prompts, seed)
    return rows + short_copies(rows)


def split_rows(rows: Iterable[Row], seed: int = 0) -> dict[str, list[Row]]:
    """Rows by split (``train``, ``validation``, ``test``), by prompt group.

    Only training sources enter ``train`` (``stl_safe`` rows of the train split are dropped), and
    every group with a ``spard_eval`` row goes to ``test`` whole.
    """
    rows = list(rows)
    test_only = {r["group"] for r in rows if r["source"] in TEST_ONLY_SOURCES}
    out: dict[str, list[Row]] = {name: [] for name in SPLITS}
    for row in rows:
        split = "test" if row["group"] in test_only else split_of(row["group"], seed)
        if split == "train" and row["source"] not in TRAIN_SOURCES:
            continue
        out[split].append(row)
    return out


def heldout_rows(data_dir: str | os.PathLike | None = None, seed: int = 0,
                 max_prompts: int | None = None) -> dict[str, list[Row]]:
    """Held-out (test-split) labelled rows per source, sources in :data:`SOURCES` order."""
    test = split_rows(load_labelled_rows(data_dir, max_prompts, seed), seed)["test"]
    return {source: [r for r in test if r["source"] == source] for source in SOURCES}



def split_table(splits: Mapping[str, Sequence[Row]]) -> list[Row]:
    """Every row of ``splits`` once, with its ``split`` and whether the final judge is ``fitted`` on
    it (train and validation rows of the training sources: the judge is refitted on both)."""
    return [dict(row, split=name, fitted=name != "test" and row["source"] in TRAIN_SOURCES)
            for name in SPLITS for row in splits.get(name, ())]


def write_split_rows(path: str | os.PathLike, splits: Mapping[str, Sequence[Row]]) -> int:
    """Write :func:`split_table` of ``splits`` to ``path`` as JSON lines; returns the row count."""
    rows = split_table(splits)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
