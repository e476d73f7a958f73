"""The gated training data of the ``hidden`` judge: only judge-reserved prompts, never an evaluation prompt.

The pipeline keeps a fixed ~30% of prompts for the judge (:func:`nlsr.data.disjoint.judge_reserved`)
and never trains on them. From the data sets the pipeline draws from (the SPARD BeaverTails pairs,
PKU-SafeRLHF), this judge trains **only** on rows whose prompt is judge-reserved; every row of every
source (JailbreakBench too) must also not share a normalised prompt
(:func:`nlsr.data.disjoint.normalise_prompt`) with any evaluation set
(:func:`nlsr.data.disjoint.evaluation_set_names`). What the gate removed is counted in ``gate``.

The rows imitate what the judge will read: short answers of a small model, cut at
:data:`MAX_RESPONSE_TOKENS` tokens of the SmolLM2 tokenizer, to harmful prompts.

* ``spard_unsafe`` (harmful): the BeaverTails ``unsafe`` answer, cut; a cut that reads as a refusal
  (:func:`nlsr.evaluation.judges.refusal.is_refusal`) is dropped.
* ``spard_safe`` (not harmful): the SPARD refusal, cut.
* ``spard_lecture`` (not harmful): the SPARD refusal without its refusing sentences (those with a
  refusal phrase), cut: the on-topic, non-refusing "it is important to respect ..." talk that small
  models produce instead of an answer; kept only when at least 6 words remain and the matcher no
  longer reads a refusal.
* ``pku_safe`` (not harmful): PKU-SafeRLHF safe answers (refusals and plain answers), cut.
* ``offtopic`` (not harmful): a reserved SPARD prompt paired with the cut ``pku_safe`` answer of
  another reserved prompt: a non-refusal that does not address the request (the gold guideline's
  "vague or off-topic" answers are not harmful).
* ``jailbreakbench`` (label: JBB's ``jailbroken``): goal and response, cut the same way (a
  jailbroken cut that reads as a refusal is dropped).

At most ``max_per_source`` prompts per source (a fixed hash order), so that feature extraction
stays small. Rows are split by normalised prompt into train / validation / test (70/15/15, seeded
hash); hyper-parameters are chosen on validation only, then the judge is refitted on train +
validation. **The hand-labelled gold set is never read here.**
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

MAX_RESPONSE_TOKENS = 48
DEFAULT_MAX_PER_SOURCE = 700
SOURCES = ("spard_unsafe", "spard_safe", "spard_lecture", "pku_safe", "offtopic", "jailbreakbench")
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.7, 0.15, 0.15)
SPARD_TRAIN = "beavertails_derived_spard/train_beaverTails_train.jsonl"
PKU_SAFE = "pku_saferlhf_derived/pku_safe_sft.json"
JBB_DIR = "jailbreakbench"

Row = dict[str, Any]


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"hidden-judge:{seed}\0{key}".encode()).hexdigest()
    return int(digest[:13], 16) / 16 ** 13


def split_of(prompt: str, seed: int = 0) -> str:
    """train / validation / test of a prompt: a seeded hash of its normalised text."""
    from nlsr.data.disjoint import normalise_prompt

    u, edge = _unit(seed, normalise_prompt(prompt)), 0.0
    for name, share in zip(SPLITS, FRACTIONS, strict=True):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def evaluation_prompts(data_dir: str | os.PathLike | None = None) -> set[str]:
    """The normalised prompts of every evaluation set (:func:`nlsr.data.disjoint.evaluation_set_names`)."""
    from nlsr.data import load_records
    from nlsr.data.disjoint import evaluation_set_names, prompt_keys

    keys: set[str] = set()
    for name in evaluation_set_names("harmful_eval"):
        keys |= prompt_keys(load_records(name, data_dir))
    return keys


def cutter(max_tokens: int = MAX_RESPONSE_TOKENS):
    """A function cutting a response to its first ``max_tokens`` SmolLM2 tokens (None: no cut)."""
    if max_tokens is None:
        return lambda text: text.strip()
    from nlsr.weights.models import load_tokenizer

    tok = load_tokenizer("smollm2")

    def cut(text: str) -> str:
        ids = tok(text.strip(), add_special_tokens=False)["input_ids"][:max_tokens]
        return tok.decode(ids, skip_special_tokens=True).strip()
    return cut


def _read(path: Path) -> Any:
    if not path.is_file():
        raise NlsrError(f"labelled data file '{path}' is missing; point --data-dir at the offline data "
                        "folder (shared/data)")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise NlsrError(f"'{path}' is not valid JSON: {err}") from None


def _jbb(folder: Path) -> list[Row]:
    files = sorted(glob.glob(str(folder / "*.json")))
    if not files:
        raise NlsrError(f"no JailbreakBench files (*.json) in '{folder}'")
    out = []
    for name in files:
        for rec in _read(Path(name)).get("jailbreaks", []):
            if isinstance(rec.get("response"), str) and rec.get("jailbroken") is not None:
                out.append({"prompt": rec["goal"], "response": rec["response"],
                            "harmful": bool(rec["jailbroken"]), "source": "jailbreakbench"})
    return out


def gate_rows(rows: Iterable[Mapping], evaluation: set[str], reserved_only: bool,
              counts: dict[str, int]) -> list[Row]:
    """``rows`` whose prompt is not an evaluation prompt and (``reserved_only``) is judge-reserved;
    the drops are added to ``counts`` (``not_reserved``, ``evaluation``)."""
    from nlsr.data.disjoint import judge_reserved, normalise_prompt

    kept = []
    for row in rows:
        if reserved_only and not judge_reserved(row["prompt"]):
            counts["not_reserved"] = counts.get("not_reserved", 0) + 1
        elif normalise_prompt(row["prompt"]) in evaluation:
            counts["evaluation"] = counts.get("evaluation", 0) + 1
        else:
            kept.append(dict(row))
    return kept


def lecture_of(refusal: str) -> str:
    """A refusal without its refusing sentences (those with a refusal phrase)."""
    from nlsr.evaluation.judges.refusal import is_refusal

    sentences = re.split(r"(?<=[.!?])\s+", refusal.strip())
    return " ".join(s for s in sentences if s and not is_refusal(s)).strip()


def _cap(rows: list[Row], n: int | None, seed: int, salt: str) -> list[Row]:
    """At most ``n`` prompts of ``rows`` (all rows of a kept prompt), a fixed hash order."""
    from nlsr.data.disjoint import normalise_prompt

    if n is None:
        return rows
    prompts = sorted({normalise_prompt(r["prompt"]) for r in rows}, key=lambda p: _unit(seed, salt + p))
    keep = set(prompts[:n])
    return [r for r in rows if normalise_prompt(r["prompt"]) in keep]


def build_rows(data_dir: str | os.PathLike | None = None, max_per_source: int | None = DEFAULT_MAX_PER_SOURCE,
               seed: int = 0, max_tokens: int | None = MAX_RESPONSE_TOKENS,
               evaluation: set[str] | None = None) -> tuple[list[Row], dict[str, dict[str, int]]]:
    """The gated labelled rows ``{prompt, response, harmful, source, split}`` and the gate's counts
    per raw source (``spard``, ``pku_safe``, ``jailbreakbench``)."""
    from nlsr.evaluation.judges.refusal import is_refusal
    from nlsr.paths import data_dir as resolve

    root = resolve(data_dir)
    if evaluation is None:
        evaluation = evaluation_prompts(root)
    cut = cutter(max_tokens)
    gate: dict[str, dict[str, int]] = {}

    spard_raw = _read(root / SPARD_TRAIN)
    for i, rec in enumerate(spard_raw):
        if not all(isinstance(rec.get(k), str) for k in ("prompt", "safe", "unsafe")):
            raise NlsrError(f"{root / SPARD_TRAIN} line {i + 1} lacks string fields 'prompt', 'safe', 'unsafe'")
    spard = _cap(gate_rows(spard_raw, evaluation, True, gate.setdefault("spard", {})),
                 max_per_source, seed, "spard")
    pku = _cap(gate_rows(_read(root / PKU_SAFE), evaluation, True, gate.setdefault("pku_safe", {})),
               max_per_source, seed, "pku")
    jbb = _cap(gate_rows(_jbb(root / JBB_DIR), evaluation, False, gate.setdefault("jailbreakbench", {})),
               max_per_source, seed, "jbb")

    rows: list[Row] = []
    for rec in spard:
        unsafe = cut(rec["unsafe"])
        if unsafe and not is_refusal(unsafe):
            rows.append({"prompt": rec["prompt"], "response": unsafe, "harmful": True, "source": "spard_unsafe"})
        rows.append({"prompt": rec["prompt"], "response": cut(rec["safe"]), "harmful": False,
                     "source": "spard_safe"})
        lecture = cut(lecture_of(rec["safe"]))
        if len(lecture.split()) >= 6 and not is_refusal(lecture):
            rows.append({"prompt": rec["prompt"], "response": lecture, "harmful": False, "source": "spard_lecture"})
    pku_cut = [dict(rec, response=cut(rec["response"])) for rec in pku]
    rows += [{"prompt": r["prompt"], "response": r["response"], "harmful": False, "source": "pku_safe"}
             for r in pku_cut if r["response"]]
    # off-topic: a reserved harmful prompt with a non-refusing safe answer written for another prompt
    answers = [r["response"] for r in pku_cut if r["response"] and not is_refusal(r["response"])]
    if answers:
        for i, rec in enumerate(spard):
            if i % 2 == 0:   # half the SPARD prompts, so off-topic rows do not outnumber the rest
                j = int(_unit(seed, "offtopic" + rec["prompt"]) * len(answers))
                rows.append({"prompt": rec["prompt"], "response": answers[j], "harmful": False,
                             "source": "offtopic"})
    for rec in jbb:
        response = cut(rec["response"])
        if response and not (rec["harmful"] and is_refusal(response)):
            rows.append({"prompt": rec["prompt"], "response": response, "harmful": rec["harmful"],
                         "source": "jailbreakbench"})
    for row in rows:
        row["split"] = split_of(row["prompt"], seed)
    return rows, gate


def by_split(rows: Sequence[Row]) -> dict[str, list[Row]]:
    return {name: [r for r in rows if r["split"] == name] for name in SPLITS}


def write_rows(path: str | os.PathLike, rows: Sequence[Row],
               fitted_splits: Sequence[str] = ("train", "validation")) -> int:
    """Every row with its split and whether the saved judge was ``fitted`` on it, as JSON lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row, fitted=row["split"] in fitted_splits), ensure_ascii=False) + "\n")
    return len(rows)
