"""From an :class:`ExperimentConfig` to the ordered stage graph, and the entry point ``run_experiment``."""

from __future__ import annotations

from pathlib import Path

from nlsr.config import ExperimentConfig
from nlsr.errors import NlsrError
from nlsr.paths import data_dir
from nlsr.pipeline import RunContext, Stage, run_stages


def align_data_params(sections: dict) -> dict:
    """Only the settings that change the alignment data (not learning rates, say)."""
    return {"sft": {k: sections["align"]["sft"][k] for k in ("dataset", "n")},
            "dpo": {k: sections["align"]["dpo"][k] for k in ("dataset", "n")},
            "calibration": {k: sections["realign"][k] for k in ("calibration_dataset", "calibration_n")}}


def task_data_params(sections: dict) -> dict:
    """Only the settings that change the fine-tuning and evaluation data."""
    attack, ev = sections["attack"], sections["evaluate"]
    return {"attack": {k: attack[k] for k in ("task", "n", "p", "source", "poison_dataset")},
            "evaluate": {k: ev[k] for k in ("harmful_dataset", "harmful_n", "task_n", "xstest_n")}}


def build_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The experiment's stages in dependency order."""
    from nlsr.judges.classifier import default_dir  # its name versions the trained judge
    from nlsr.precision import resolve_precision
    from nlsr.stages import align, attack, data, evaluate, realign, report

    sections = cfg.model_dump()
    data_common = {"model": cfg.model, "template": cfg.template, "seed": cfg.seed}
    # Stages that run a model depend on the precision it ran in: a float32 run never reuses bf16 stages.
    common = {**data_common, "precision": resolve_precision(cfg.precision, cfg.device).dtype}
    stages = [
        Stage("data-align", data.run_align, {**data_common, **align_data_params(sections)}),
        Stage("data", data.run_task, {**data_common, **task_data_params(sections)}),
        Stage("align_sft", align.run_sft, {**common, "sft": sections["align"]["sft"], "lora": sections["lora"]},
              ["data-align"]),
        Stage("align_dpo", align.run_dpo, {**common, "dpo": sections["align"]["dpo"], "lora": sections["lora"]},
              ["data-align", "align_sft"]),
        Stage("attack", attack.run_attack, {**common, "attack": sections["attack"]},
              ["data", "align_sft", "align_dpo"]),
    ]
    if cfg.attack.nonaligned_control:
        stages.append(Stage("attack_nonaligned", attack.run_nonaligned,
                            {**common, "attack": sections["attack"], "lora": sections["lora"]}, ["data"]))
    realign_section = {k: v for k, v in sections["realign"].items() if k != "variants"}
    seen: set[str] = set()
    for variant in cfg.realign.variants:
        if variant.method != "nlsr":
            continue
        ident = realign.identify_id(variant)
        if ident in seen:
            continue
        seen.add(ident)
        stages.append(Stage(f"identify-{ident}", realign.run_identify(variant),
                            {**common, "realign": realign_section, "beta": variant.beta,
                             "scale_both": variant.scale_both, "rho": variant.rho, "q": variant.q,
                             "masks": variant.masks}, ["data-align", "align_sft", "align_dpo"]))
    for variant in cfg.realign.variants:
        inputs = ["data", "align_sft", "align_dpo", "attack"]
        if variant.method == "nlsr":
            inputs.append(f"identify-{realign.identify_id(variant)}")
        stages.append(Stage(f"realign-{variant.name}", realign.run_variant(variant),
                            {**data_common, "variant": variant.model_dump()}, inputs))

    from nlsr.generation import resolve_backend

    generation = {k: v for k, v in sections["evaluate"].items() if k != "judges"}
    generation["backend"] = resolve_backend(cfg.evaluate.backend)   # auto -> what runs here
    eval_params = {**common, "evaluate": generation, "task": cfg.attack.task}
    models: list[tuple[str, str, list[str]]] = []

    def add_eval(label: str, base: str, adapter_stage: str, cost: list[str]) -> None:
        name = f"evaluate-{label}"
        inputs = ["data", "align_sft", adapter_stage] if base == "weak" else ["data", adapter_stage]
        stages.append(Stage(name, evaluate.run_model(base, adapter_stage), eval_params, inputs))
        models.append((label, name, cost))

    if cfg.evaluate.evaluate_aligned:
        add_eval("aligned", "weak", "align_dpo", ["align_sft", "align_dpo"])
    if cfg.attack.nonaligned_control:
        add_eval("nonaligned", "base", "attack_nonaligned", ["attack_nonaligned"])
    add_eval("attacked", "weak", "attack", ["attack"])
    for variant in cfg.realign.variants:
        cost = [f"realign-{variant.name}"]
        if variant.method == "nlsr":
            cost.insert(0, f"identify-{realign.identify_id(variant)}")
        add_eval(variant.name, "weak", f"realign-{variant.name}", cost)
    if cfg.defences:
        stages.insert(2, Stage("data-defences", data.run_defence_rows,
                               {**data_common, "sft": sections["align"]["sft"], "realign": realign_section,
                                "defence_safety_n": cfg.defence_safety_n}))
    for defence in cfg.defences:
        params = {**common, "defence": defence.model_dump()}
        aligned_stage = "align_dpo"
        if defence.method == "vaccine":
            aligned_stage = f"align_dpo-{defence.name}"
            stages.append(Stage(aligned_stage, align.run_dpo_vaccine(2.0 if defence.rho is None else defence.rho),
                                {**params, "dpo": sections["align"]["dpo"], "lora": sections["lora"]},
                                ["data-align", "align_sft"]))
            run = attack.run_attack_from(aligned_stage)
        else:
            run = attack.run_attack_from("align_dpo", defence)
        stages.append(Stage(f"attack-{defence.name}", run, {**params, "attack": sections["attack"]},
                            ["data", "data-defences", "align_sft", aligned_stage]))
        cost = [aligned_stage, f"attack-{defence.name}"] if defence.method == "vaccine" else [f"attack-{defence.name}"]
        add_eval(defence.name, "weak", f"attack-{defence.name}", cost)
    needed = sorted({s for _, e, c in models for s in [e, *c]})
    stages.append(Stage("report", report.run(models),
                        {"models": models, "judges": cfg.evaluate.judges, "judge_version": default_dir().name}, needed))
    return stages


def run_experiment(cfg: ExperimentConfig, force: set[str] | None = None,
                   data: str | Path | None = None, log=print) -> Path:
    """Run (or resume) every stage of ``cfg``; returns the run directory."""
    ctx = RunContext(config=cfg, run_dir=Path(cfg.runs_dir) / cfg.name,
                     data_dir=data_dir(data if data is not None else cfg.data_dir))
    reuse = [Path(r) for r in cfg.reuse_from]
    missing = [str(r) for r in reuse if not r.is_dir()]
    if missing:
        raise NlsrError(f"reuse_from names run folders that do not exist: {missing}; fix the paths or drop them")
    log(f"[machine] {ctx.precision.line()}")
    run_stages(ctx, build_stages(cfg), force=force, log=log, reuse_from=reuse)
    return ctx.run_dir
