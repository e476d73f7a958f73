"""Stage 1: resolve, split and freeze every data set (two stages, alignment and task; both fail before training)."""

from __future__ import annotations

from pathlib import Path

from nlsr.data import build_poisoned, get_task, load_ready_made, load_records, split_records
from nlsr.errors import NlsrError
from nlsr.io import write_json
from nlsr.stages.common import write_jsonl


def _take(name: str, rows: list[dict], n: int, what: str) -> list[dict]:
    if len(rows) < n:
        raise NlsrError(f"{what}: dataset '{name}' has {len(rows)} usable rows but {n} were asked for; "
                        "lower the n in the config")
    return rows[:n]


def _write(out: Path, parts: list[tuple[str, list[dict]]], sources: dict[str, str]) -> dict:
    card: dict = {name: {"rows": write_jsonl(out / f"{name}.jsonl", rows)} for name, rows in parts}
    card["sources"] = sources
    return card


def _finish(out: Path, card: dict) -> dict:
    write_json(out / "data_card.json", card)
    counts = ", ".join(f"{k} {v['rows']}" for k, v in card.items() if isinstance(v, dict) and "rows" in v)
    return {"card": card, "line": counts}


def run_align(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The alignment data (SFT, DPO) and the calibration rows for identification.

    A stage of its own so that runs which differ only in the attack or the evaluation share one
    aligned model (its key does not change with them)."""
    cfg, seed = ctx.config, ctx.config.seed
    d = ctx.data_dir
    sft_all = load_records(cfg.align.sft.dataset, d)
    if cfg.realign.calibration_dataset == cfg.align.sft.dataset:
        need = cfg.align.sft.n + cfg.realign.calibration_n
        if len(sft_all) < need:
            raise NlsrError(f"align.sft.n + realign.calibration_n = {need} rows are needed from "
                            f"'{cfg.align.sft.dataset}' (disjoint), but it has {len(sft_all)}")
        sft, calibration = split_records(sft_all, [cfg.align.sft.n, cfg.realign.calibration_n], seed=seed)
    else:
        sft = _take(cfg.align.sft.dataset, split_records(sft_all, [1.0], seed)[0], cfg.align.sft.n,
                    "align.sft.n")
        calib_all = load_records(cfg.realign.calibration_dataset, d)
        calibration = _take(cfg.realign.calibration_dataset, split_records(calib_all, [1.0], seed)[0],
                            cfg.realign.calibration_n, "realign.calibration_n")
    dpo_all = load_records(cfg.align.dpo.dataset, d)
    dpo = _take(cfg.align.dpo.dataset, split_records(dpo_all, [1.0], seed)[0], cfg.align.dpo.n,
                "align.dpo.n")
    card = _write(out, [("sft", sft), ("calibration", calibration), ("dpo", dpo)],
                  {"sft": cfg.align.sft.dataset, "calibration": cfg.realign.calibration_dataset,
                   "dpo": cfg.align.dpo.dataset})
    return _finish(out, card)


def run_task(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The (poisoned) fine-tuning data and the evaluation sets: harmful prompts, task test set, XSTest."""
    cfg, seed = ctx.config, ctx.config.seed
    d = ctx.data_dir
    task = get_task(cfg.attack.task)
    if cfg.attack.source == "ready_made":
        attack = load_ready_made(cfg.attack.task, cfg.attack.p, d)
        if len(attack) != cfg.attack.n:
            raise NlsrError(f"attack.source=ready_made has {len(attack)} rows; set attack.n to {len(attack)}")
    else:
        attack = build_poisoned(load_records(task.train_dataset, d), load_records(cfg.attack.poison_dataset, d),
                                n=cfg.attack.n, p=cfg.attack.p, seed=seed)
    ev = cfg.evaluate
    harmful = _take(ev.harmful_dataset, load_records(ev.harmful_dataset, d), ev.harmful_n, "evaluate.harmful_n")
    task_eval = _take(task.eval_dataset, load_records(task.eval_dataset, d), ev.task_n, "evaluate.task_n")
    xstest = [r for r in load_records("xstest", d) if r["label"] == "safe"][:ev.xstest_n]
    card = _write(out, [("attack", attack), ("harmful_eval", harmful), ("task_eval", task_eval),
                        ("xstest_safe", xstest)],
                  {"attack": f"{cfg.attack.task} ({cfg.attack.source}, p={cfg.attack.p})",
                   "harmful_eval": ev.harmful_dataset, "task_eval": task.eval_dataset, "xstest_safe": "xstest"})
    card["attack"]["harmful_rows"] = sum(1 for r in attack if r.get("flag") == "unsafe")
    return _finish(out, card)


def run_defence_rows(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Safety rows for the fine-tuning-stage defences (Lisa, mixing): the next ``defence_safety_n``
    rows of the same seeded shuffle that gave the SFT and calibration rows, so all three are disjoint."""
    cfg = ctx.config
    rows = load_records(cfg.align.sft.dataset, ctx.data_dir)
    used = cfg.align.sft.n + (cfg.realign.calibration_n if cfg.realign.calibration_dataset == cfg.align.sft.dataset
                              else 0)
    if len(rows) < used + cfg.defence_safety_n:
        raise NlsrError(f"defence_safety_n = {cfg.defence_safety_n}: '{cfg.align.sft.dataset}' has {len(rows)} rows, "
                        f"{used} of them already used for SFT and calibration")
    extra = split_records(rows, [used, cfg.defence_safety_n], seed=cfg.seed)[1]
    count = write_jsonl(out / "safety_extra.jsonl", extra)
    return {"rows": count, "line": f"{count} safety rows"}
