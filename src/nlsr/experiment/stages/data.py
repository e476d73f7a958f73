"""Stage 1: resolve, gate, split and freeze every data set (before any training).

Three kinds of data stage:

- ``data``: the evaluation sets (harmful prompts split into validation and test, extra harmful
  sets, the task's test rows, XSTest's safe prompts stratified by type). Seed-independent, so every
  seed is scored on the same prompts and the differences between models can be paired.
- ``data-align``: the alignment rows (SFT, calibration, DPO, helpful prompts), none of which may
  share a prompt with an evaluation set (the disjointness gate, :mod:`nlsr.data.disjoint`).
- ``data-attack`` (one per seed): the poisoned fine-tuning rows, gated against the evaluation sets,
  and their harmful rows also against the SFT and calibration prompts.

Every data card counts the rows the gate removed, per pair of sets, and records the data folder
(``data_dir``: its path and whether it is the bundled subset, :func:`nlsr.paths.is_bundled`). On the
bundled subset, a size check that fails also says how to point nlsr at the full data.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import defaultdict
from pathlib import Path

from nlsr.data import build_poisoned, get_task, load_ready_made, load_records, split_records
from nlsr.data.disjoint import Gate, evaluation_set_names, normalise_prompt, prompt_of
from nlsr.errors import NlsrError
from nlsr.experiment.stages.common import read_jsonl, write_jsonl
from nlsr.io import write_json
from nlsr.paths import FULL_DATA_HINT, is_bundled

XSTEST = "xstest"
XSTEST_VALIDATION_SEED = 1
"""Seed of the XSTest validation draw (the test draw keeps seed 0, the prompts it always had)."""
SPLIT_SALT = "nlsr-harmful-split-v1"   # the validation/test split of the harmful prompts; never change
EXTRA_SAMPLE_SEED = 0                  # the fixed sample of each extra harmful set


def _take(name: str, rows: list, n: int, what: str) -> list:
    if len(rows) < n:
        raise NlsrError(f"{what}: dataset '{name}' has {len(rows)} usable rows but {n} were asked for; "
                        "lower the n in the config")
    return rows[:n]


def data_folder(data_dir: Path) -> dict:
    """What a data card records of the data folder: whether it is the bundled subset, and its path
    (``<nlsr bundled data>``, else its last two parts, e.g. ``shared/data``: data cards are committed,
    so no machine-specific prefix; the stage keys hold the content hashes of the files read)."""
    bundled = is_bundled(data_dir)
    path = "<nlsr bundled data>" if bundled else Path(*Path(data_dir).resolve().parts[-2:]).as_posix()
    return {"path": path, "bundled": bundled}


def with_bundle_hint(err: NlsrError, data_dir: Path) -> NlsrError:
    """``err``, with how to use the full data appended when ``data_dir`` is the bundled subset."""
    if not is_bundled(data_dir):
        return err
    return NlsrError(f"{err}. The data folder is the bundled subset, which has rows enough for "
                     f"configs/smoke.yaml only: {FULL_DATA_HINT}")


def _data_stage(run):
    """A data stage function whose errors name the full data when it ran on the bundled subset."""
    @functools.wraps(run)
    def wrapped(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        try:
            return run(ctx, out, inputs)
        except NlsrError as err:
            raise with_bundle_hint(err, ctx.data_dir) from err
    return wrapped


def _write(out: Path, parts: list[tuple[str, list[dict]]], sources: dict[str, str]) -> dict:
    card: dict = {name: {"rows": write_jsonl(out / f"{name}.jsonl", rows)} for name, rows in parts}
    card["sources"] = sources
    return card


def _finish(ctx, out: Path, card: dict, gate: Gate | None = None) -> dict:
    card["data_dir"] = data_folder(ctx.data_dir)
    if gate is not None:
        card["gate"] = {"removed": gate.counts, "evaluation_sets": sorted(gate.forbidden)}
    write_json(out / "data_card.json", card)
    counts = ", ".join(f"{k} {v['rows']}" for k, v in card.items() if isinstance(v, dict) and "rows" in v)
    return {"card": card, "line": counts, "gate_lines": gate.lines() if gate else []}


def _unique_prompts(rows: list[dict]) -> list[dict]:
    """The first row of each normalised prompt (data sets repeat prompts; copies would cross splits)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = normalise_prompt(row["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# ---- the evaluation sets and the gate ------------------------------------------------------------

def evaluation_gate(cfg, data_dir: Path) -> Gate:
    """A :class:`Gate` holding the prompts of :func:`evaluation_set_names`."""
    gate = Gate()
    for name in evaluation_set_names(cfg.evaluate.harmful_dataset):
        gate.add(name, load_records(name, data_dir))
    return gate


def harmful_split(prompt: str, validation_fraction: float) -> str:
    """``validation`` or ``test``: a fixed hash of the normalised prompt, the same for every seed and run
    (used for the harmful prompts and for the task's test rows)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{normalise_prompt(prompt)}".encode()).hexdigest()
    return "validation" if int(digest[:12], 16) / 16 ** 12 < validation_fraction else "test"


def stratified_xstest(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` of XSTest's safe prompts, as even as possible over their types (round robin over the
    types in a fixed order, each type's prompts in a seeded random order)."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_type[row.get("type", "")].append(row)
    rng = random.Random(seed)
    queues = []
    for kind in sorted(by_type):
        items = list(by_type[kind])
        rng.shuffle(items)
        queues.append(items)
    out: list[dict] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


@_data_stage
def run_eval(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The evaluation sets: harmful prompts (with their validation/test split), extra harmful sets,
    the task's test rows, XSTest's safe prompts (stratified by type)."""
    cfg, d = ctx.config, ctx.data_dir
    ev = cfg.evaluate
    task = get_task(cfg.attack.task)
    harmful = _take(ev.harmful_dataset, load_records(ev.harmful_dataset, d), ev.harmful_n, "evaluate.harmful_n")
    harmful = [{**r, "split": harmful_split(r["prompt"], ev.validation_fraction)} for r in harmful]
    extra = []
    for name in ev.extra_harmful:
        rows = load_records(name, d)
        sample = split_records(rows, [min(ev.extra_harmful_n, len(rows))], seed=EXTRA_SAMPLE_SEED)[0]
        extra += [{**r, "set": name} for r in sample]
    task_eval = _take(task.eval_dataset, load_records(task.eval_dataset, d), ev.task_n, "evaluate.task_n")
    task_eval = [{**r, "split": harmful_split(prompt_of(r), ev.validation_fraction)} for r in task_eval]
    safe = [r for r in load_records(XSTEST, d) if r["label"] == "safe"]
    xstest = [{**r, "split": "test"} for r in stratified_xstest(safe, ev.xstest_n)]
    if ev.xstest_validation_n:
        taken = {r["prompt"] for r in xstest}
        rest = [r for r in safe if r["prompt"] not in taken]
        if ev.xstest_validation_n > len(rest):
            raise NlsrError(f"evaluate.xstest_validation_n = {ev.xstest_validation_n}, but only {len(rest)} XSTest "
                              f"safe prompts are left after the {len(xstest)} test prompts: lower "
                              "evaluate.xstest_validation_n or evaluate.xstest_n")
        xstest += [{**r, "split": "validation"}
                   for r in stratified_xstest(rest, ev.xstest_validation_n, seed=XSTEST_VALIDATION_SEED)]
    card = _write(out, [("harmful_eval", harmful), ("harmful_extra", extra), ("task_eval", task_eval),
                        ("xstest_safe", xstest)],
                  {"harmful_eval": ev.harmful_dataset, "harmful_extra": ", ".join(ev.extra_harmful),
                   "task_eval": task.eval_dataset, "xstest_safe": "xstest (safe prompts, stratified by type)"})
    card["harmful_eval"]["split"] = {s: sum(r["split"] == s for r in harmful) for s in ("validation", "test")}
    card["harmful_eval"]["split_rule"] = (f"sha256('{SPLIT_SALT}:' + normalised prompt) < "
                                          f"{ev.validation_fraction} -> validation")
    card["task_eval"]["split"] = {s: sum(r["split"] == s for r in task_eval) for s in ("validation", "test")}
    card["xstest_safe"]["types"] = {k: sum(r["type"] == k for r in xstest) for k in sorted({r["type"] for r in xstest})}
    card["xstest_safe"]["split"] = {s: sum(r["split"] == s for r in xstest) for s in ("validation", "test")}
    return _finish(ctx, out, card)


# ---- alignment data ------------------------------------------------------------------------------

@_data_stage
def run_align(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The alignment data (SFT, DPO, helpful prompts) and the calibration rows for identification,
    every set gated against the evaluation prompts and SFT/calibration disjoint by prompt text.

    A stage of its own so that runs which differ only in the attack or the evaluation share one
    aligned model (its key does not change with them)."""
    cfg, seed, d = ctx.config, ctx.config.seed, ctx.data_dir
    gate = evaluation_gate(cfg, d)
    sft_all = _unique_prompts(load_records(cfg.align.sft.dataset, d))
    sft_all = gate.filter("sft", sft_all, judge_reserve=True)
    if cfg.realign.calibration_dataset == cfg.align.sft.dataset:
        need = cfg.align.sft.n + cfg.realign.calibration_n
        if len(sft_all) < need:
            raise NlsrError(f"align.sft.n + realign.calibration_n = {need} rows are needed from "
                            f"'{cfg.align.sft.dataset}' (distinct prompts, none in an evaluation set), "
                            f"but it has {len(sft_all)}; lower the two sizes")
        sft, calibration = split_records(sft_all, [cfg.align.sft.n, cfg.realign.calibration_n], seed=seed)
    else:
        sft = _take(cfg.align.sft.dataset, split_records(sft_all, [1.0], seed)[0], cfg.align.sft.n, "align.sft.n")
        gate.add("sft", sft, training=True)
        calib_all = gate.filter("calibration", _unique_prompts(load_records(cfg.realign.calibration_dataset, d)),
                                judge_reserve=True)
        calibration = _take(cfg.realign.calibration_dataset, split_records(calib_all, [1.0], seed)[0],
                            cfg.realign.calibration_n, "realign.calibration_n")
    dpo_all = gate.filter("dpo", load_records(cfg.align.dpo.dataset, d), judge_reserve=True)
    dpo = _take(cfg.align.dpo.dataset, split_records(dpo_all, [1.0], seed)[0], cfg.align.dpo.n, "align.dpo.n")
    parts = [("sft", sft), ("calibration", calibration), ("dpo", dpo)]
    sources = {"sft": cfg.align.sft.dataset, "calibration": cfg.realign.calibration_dataset,
               "dpo": cfg.align.dpo.dataset}
    helpful_cfg = cfg.align.helpful
    if helpful_cfg.n:
        helpful = _take(helpful_cfg.dataset, harmless_prompts(gate, sft + calibration + dpo, helpful_cfg.dataset, d,
                                                              seed), helpful_cfg.n, "align.helpful.n")
        parts.append(("helpful_prompts", helpful))
        sources["helpful_prompts"] = helpful_cfg.dataset
    return _finish(ctx, out, _write(out, parts, sources), gate)


def harmless_prompts(gate: Gate, safety_rows: list[dict], dataset: str, data_dir: Path, seed: int) -> list[dict]:
    """The harmless prompts of ``dataset`` in their seeded order, each prompt once, gated against the
    evaluation sets and the safety prompts (a harmless prompt must not be a harmful one either).
    The helpful set is the first ``align.helpful.n`` of them."""
    gate.add("safety_prompts", safety_rows, training=True)
    rows = gate.filter("helpful_prompts", _unique_prompts(load_records(dataset, data_dir)))
    return split_records(rows, [1.0], seed)[0]


@_data_stage
def run_defence_rows(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Safety rows for the fine-tuning-stage defences (Lisa, mixing): gated like the SFT rows and
    disjoint (by prompt) from the SFT and calibration rows."""
    cfg = ctx.config
    gate = evaluation_gate(cfg, ctx.data_dir)
    gate.add("sft", read_jsonl(inputs["data-align"] / "sft.jsonl"), training=True)
    gate.add("calibration", read_jsonl(inputs["data-align"] / "calibration.jsonl"), training=True)
    rows = gate.filter("defence_safety", _unique_prompts(load_records(cfg.align.sft.dataset, ctx.data_dir)),
                       judge_reserve=True)
    if len(rows) < cfg.defence_safety_n:
        raise NlsrError(f"defence_safety_n = {cfg.defence_safety_n}: '{cfg.align.sft.dataset}' has only "
                        f"{len(rows)} rows left once SFT, calibration and evaluation prompts are excluded; "
                        "lower defence_safety_n")
    extra = split_records(rows, [cfg.defence_safety_n], seed=cfg.seed)[0]
    count = write_jsonl(out / "safety_extra.jsonl", extra)
    write_json(out / "data_card.json", {"safety_extra": {"rows": count}, "gate": {"removed": gate.counts},
                                        "data_dir": data_folder(ctx.data_dir)})
    return {"rows": count, "line": f"{count} safety rows", "gate_lines": gate.lines()}


@_data_stage
def run_refusal_pairs(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """DPO pairs on the SFT set's harmful prompts: chosen = the SFT refusal, rejected = the harmful
    answer that ``align.dpo.refusal_pairs_dataset`` gives the same prompt (a seeded sample)."""
    cfg = ctx.config
    dpo = cfg.align.dpo
    harmful = {normalise_prompt(r["prompt"]): r["response"]
               for r in load_records(dpo.refusal_pairs_dataset, ctx.data_dir)}
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": harmful[normalise_prompt(r["prompt"])]}
             for r in read_jsonl(inputs["data-align"] / "sft.jsonl") if normalise_prompt(r["prompt"]) in harmful]
    if len(pairs) < dpo.refusal_pairs:
        raise NlsrError(f"align.dpo.refusal_pairs = {dpo.refusal_pairs}, but only {len(pairs)} SFT prompts have a "
                        f"harmful answer in '{dpo.refusal_pairs_dataset}': lower align.dpo.refusal_pairs")
    pairs = split_records(pairs, [dpo.refusal_pairs], seed=cfg.seed)[0]
    card = _write(out, [("refusal_pairs", pairs)],
                  {"refusal_pairs": f"sft.jsonl refusals (chosen) vs {dpo.refusal_pairs_dataset} (rejected)"})
    return _finish(ctx, out, card)


# ---- the fine-tuning (attack) data ---------------------------------------------------------------

@_data_stage
def run_attack_data(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The poisoned fine-tuning rows of this seed: task rows gated against the evaluation sets,
    harmful rows also against the SFT and calibration prompts (the attack must not train harmful
    answers to the prompts the alignment or the identification used)."""
    cfg, seed, d = ctx.config, ctx.seed, ctx.data_dir
    task = get_task(cfg.attack.task)
    gate = evaluation_gate(cfg, d)
    if cfg.attack.source == "ready_made":
        gate.add("sft", read_jsonl(inputs["data-align"] / "sft.jsonl"), training=True)
        gate.add("calibration", read_jsonl(inputs["data-align"] / "calibration.jsonl"), training=True)
        attack = gate.filter("attack (ready-made)", load_ready_made(cfg.attack.task, cfg.attack.p, d))
    else:
        task_rows = gate.filter("task_train", load_records(task.train_dataset, d))
        gate.add("sft", read_jsonl(inputs["data-align"] / "sft.jsonl"), training=True)
        gate.add("calibration", read_jsonl(inputs["data-align"] / "calibration.jsonl"), training=True)
        poison = gate.filter("poison", _unique_prompts(load_records(cfg.attack.poison_dataset, d)), judge_reserve=True)
        attack = build_poisoned(task_rows, poison, n=cfg.attack.n, p=cfg.attack.p, seed=seed)
    card = _write(out, [("attack", attack)], {"attack": f"{cfg.attack.task} ({cfg.attack.source}, p={cfg.attack.p})"})
    card["attack"]["harmful_rows"] = sum(1 for r in attack if r.get("flag") == "unsafe")
    card["attack"]["seed"] = seed
    return _finish(ctx, out, card, gate)



def task_calibration_rows(cfg, data_dir: Path, attack_rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` clean rows of the attack's task for NLSR's ``protect_task``: from the task's training set,
    gated against every evaluation set and disjoint from this seed's fine-tuning rows, drawn with
    ``seed``. They stand for the clean task examples a defender holds (never the fine-tuning rows:
    which of those are harmful is unknown, and their long harmful answers would outweigh the task's
    short ones)."""
    task = get_task(cfg.attack.task)
    gate = evaluation_gate(cfg, data_dir)
    gate.add("attack", attack_rows, training=True)
    rows = gate.filter("task_calibration", load_records(task.train_dataset, data_dir))
    if len(rows) < n:
        raise with_bundle_hint(NlsrError(
            f"protect_task needs {n} clean {cfg.attack.task} rows outside the fine-tuning and evaluation sets, "
            f"but only {len(rows)} remain; lower the variant's task_calibration_n"), data_dir)
    return random.Random(f"task-calibration-{seed}").sample(rows, n)


def antidote_harmful_rows(cfg, data_dir: Path, attack_rows: list[dict], sft_rows: list[dict],
                          calibration_rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` harmful (prompt, harmful answer) rows for Antidote's salience scores: rows of the poison
    pool (``attack.poison_dataset``) gated like the attack's harmful rows (no prompt of an evaluation
    set, of the SFT or calibration rows, none reserved for the judges) and disjoint from this seed's
    fine-tuning rows (the defender's own harmful examples, not the attacker's), drawn with ``seed``."""
    gate = evaluation_gate(cfg, data_dir)
    gate.add("sft", sft_rows, training=True)
    gate.add("calibration", calibration_rows, training=True)
    gate.add("attack", attack_rows, training=True)
    rows = gate.filter("antidote", _unique_prompts(load_records(cfg.attack.poison_dataset, data_dir)),
                       judge_reserve=True)
    if len(rows) < n:
        raise NlsrError(f"Antidote needs {n} harmful rows outside the fine-tuning, alignment and evaluation "
                        f"sets, but only {len(rows)} remain in '{cfg.attack.poison_dataset}'; lower antidote_n")
    return random.Random(f"antidote-{seed}").sample(rows, n)
