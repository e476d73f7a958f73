"""From an :class:`ExperimentConfig` to the ordered stage graph, and the entry point ``run_experiment``."""

from __future__ import annotations

from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.experiment.config import ExperimentConfig
from nlsr.experiment.pipeline import RunContext, Stage, run_stages
from nlsr.paths import data_dir


def evaluation_data_params(sections: dict, task: str) -> dict:
    """The settings that change the evaluation sets (and so the disjointness gate)."""
    ev = sections["evaluate"]
    keys = ("harmful_dataset", "harmful_n", "validation_fraction", "extra_harmful", "extra_harmful_n",
            "task_n", "xstest_n", "xstest_validation_n")
    return {"evaluate": {k: ev[k] for k in keys if k in ev}, "task": task}


def gate_params(sections: dict) -> dict:
    """The evaluation data sets every training-side set is gated against (whole sets, not samples)."""
    from nlsr.experiment.stages.data import evaluation_set_names

    return {"evaluation_sets": evaluation_set_names(sections["evaluate"]["harmful_dataset"])}


def align_data_params(sections: dict) -> dict:
    """Only the settings that change the alignment data (not learning rates, say)."""
    helpful = sections["align"]["helpful"]
    return {"sft": {k: sections["align"]["sft"][k] for k in ("dataset", "n")},
            "dpo": {k: sections["align"]["dpo"][k] for k in ("dataset", "n")},
            "helpful": {k: helpful[k] for k in ("dataset", "n")},
            "calibration": {k: sections["realign"][k] for k in ("calibration_dataset", "calibration_n")}}


def attack_data_params(sections: dict) -> dict:
    """Only the settings that change the fine-tuning data."""
    return {k: sections["attack"][k] for k in ("task", "n", "p", "source", "poison_dataset")}


INIT_FIELDS = ("init", "fresh_r", "fresh_alpha", "full_lr")
"""The fields of the threat model (``attack.init``): outside the keys of every stage that they do not
change, so that the stages of ``init: continue`` configs keep the keys they had before the field."""


def attack_params(sections: dict) -> dict:
    """The attack section without the threat-model fields (see :data:`INIT_FIELDS`)."""
    return {k: v for k, v in sections["attack"].items() if k not in INIT_FIELDS}


def init_params(cfg: ExperimentConfig) -> dict:
    """What the threat model adds to the key of an attack stage of ``init: fresh`` or ``full``."""
    from nlsr.experiment.stages.anyfinetune import fresh_lora

    if cfg.attack.init == "fresh":
        return {"init": "fresh", "lora": fresh_lora(cfg).model_dump()}
    if cfg.attack.init == "full":
        return {"init": "full", "lr": cfg.attack.full_lr or cfg.attack.lr}
    return {}


SAFELORA_ONLY = ("direction", "ibm_conventions")


def variant_params(variant) -> dict:
    """A variant's settings, without ``granularity`` at its default (``entry``: older keys) and, for
    NLSR variants, without SafeLoRA's own fields (they cannot change an NLSR repair)."""
    params = variant.model_dump()
    if params.get("granularity") == "entry":
        del params["granularity"]
    if variant.method == "nlsr":
        for name in SAFELORA_ONLY:
            params.pop(name, None)
    if variant.protect_task is None:          # added later: older runs keep their keys
        del params["protect_task"], params["task_calibration_n"]
    if variant.protect_task is None or variant.protect_task_score == "magnitude":
        del params["protect_task_score"]
    return params


def _drop_at_default(section: dict, defaults: dict) -> None:
    """Remove from ``section`` each field of ``defaults`` that holds its default value."""
    for field, default in defaults.items():
        if section[field] == default:
            del section[field]


def build_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The experiment's stages in dependency order.

    The data, the alignment and the identification run once; the attack and everything after it
    run once per seed of ``cfg.run_seeds`` (stage names get ``-s<seed>`` when ``seeds`` is set).

    ``attack.init`` picks the threat model: ``continue`` (the aligned LoRA on W_0, the paper),
    ``fresh`` (a fresh LoRA on the merged aligned model W_a, written once by ``align_merged``) or
    ``full`` (every weight of W_a). NLSR variants at ``granularity: neuron`` get their own
    identification stage (``identify-...-neuron``); entry granularity applies to ``continue`` only."""
    from nlsr.evaluation.judges.training import default_dir  # its name versions the trained judge
    from nlsr.experiment.stages import align, anyfinetune, attack, data, evaluate, reads, realign, report
    from nlsr.experiment.stages.contrast import run_contrast_answers
    from nlsr.experiment.stages.overrefusal import run_overrefusal_pairs
    from nlsr.precision import resolve_precision

    sections = cfg.model_dump()
    data_common = {"model": cfg.model, "template": cfg.template, "seed": cfg.seed}
    # Stages that run a model depend on the precision it ran in: a float32 run never reuses bf16 stages.
    common = {**data_common, "precision": resolve_precision(cfg.precision, cfg.device).dtype}
    gate = gate_params(sections)
    helpful = cfg.align.helpful.n > 0
    # Fields added after runs were made enter the stage keys only when used, so that those runs keep
    # their keys. The helpful DPO pairs enter the DPO stages' keys only (not data-helpful's: the answers
    # are the same).
    if not cfg.evaluate.xstest_validation_n:
        del sections["evaluate"]["xstest_validation_n"]
    refusal_pairs = cfg.align.dpo.refusal_pairs
    if not refusal_pairs:
        del sections["align"]["dpo"]["refusal_pairs"], sections["align"]["dpo"]["refusal_pairs_dataset"]
    dpo_pairs = sections["align"]["helpful"].pop("dpo_pairs") if helpful else 0
    contrast_dpo_pairs = sections["align"]["contrast"].pop("dpo_pairs") if cfg.align.contrast.n else 0
    # fields added later, left out of the keys at their defaults: runs made before keep their keys
    _drop_at_default(sections["align"]["dpo"], {"sft_weight": 0.0, "train_on_dataset": True, "seed": None,
                                                "loss": "sigmoid", "seeds": None})
    _drop_at_default(sections["align"]["contrast"], {"score": "max", "trim": False})
    _drop_at_default(sections["align"]["helpful"], {"trim": False})
    _drop_at_default(sections["align"]["overrefusal"], {"trim": False})
    dpo_pair_params = ({"helpful_dpo_pairs": dpo_pairs} if dpo_pairs else {}) | (
        {"contrast_dpo_pairs": contrast_dpo_pairs} if contrast_dpo_pairs else {})
    overrefusal = cfg.align.overrefusal.pool > 0
    sft_inputs = ["data-align", *(["data-helpful"] if helpful else []),
                  *(["data-contrast"] if cfg.align.contrast.n else [])]
    dpo_extra_inputs = ((["data-helpful"] if dpo_pairs else []) + (["data-contrast"] if contrast_dpo_pairs else [])
                        + (["data-refusal-pairs"] if refusal_pairs else [])
                        + (["data-overrefusal-pairs"] if overrefusal else []))
    stages = [
        Stage("data", data.run_eval, {**data_common, **evaluation_data_params(sections, cfg.attack.task)},
              content=reads.eval_content),
        Stage("data-align", data.run_align, {**data_common, **align_data_params(sections), "gate": gate},
              content=reads.align_content),
    ]
    if refusal_pairs:
        stages.append(Stage("data-refusal-pairs", data.run_refusal_pairs,
                            {**data_common, "refusal_pairs": refusal_pairs,
                             "dataset": cfg.align.dpo.refusal_pairs_dataset}, ["data-align"],
                            content=reads.refusal_pairs_content))
    if helpful:
        stages.append(Stage("data-helpful", align.run_helpful_answers,
                            {**common, "helpful": sections["align"]["helpful"]}, ["data-align"]))
    if cfg.align.contrast.n:
        stages.append(Stage("data-contrast", run_contrast_answers,
                            {**common, "contrast": sections["align"]["contrast"]}, ["data-align"],
                            content=reads.contrast_content))
    stages.append(Stage("align_sft", align.run_sft,
                        {**common, "sft": sections["align"]["sft"], "lora": sections["lora"]}, sft_inputs))
    if overrefusal:
        stages.append(Stage("data-overrefusal-pairs", run_overrefusal_pairs,
                            {**common, "overrefusal": sections["align"]["overrefusal"]}, ["data-align", "align_sft"],
                            content=reads.overrefusal_content))
    stages.append(Stage("align_dpo", align.run_dpo,
                        {**common, "dpo": sections["align"]["dpo"], "lora": sections["lora"], **dpo_pair_params},
                        ["data-align", "align_sft", *dpo_extra_inputs]))
    init = cfg.attack.init
    merged = anyfinetune.MERGED
    if init != "continue":      # the released aligned model W_a, shared by every seed
        stages.append(Stage(merged, anyfinetune.run_merge_aligned, {**data_common, "merge": "W_0 + ΔW_a"},
                            ["align_sft", "align_dpo"]))
    realign_section = {k: v for k, v in sections["realign"].items() if k not in ("variants", "sweep")}
    all_variants = list(cfg.realign.variants) + cfg.realign.swept_variants()
    seen: set[str] = set()
    for variant in all_variants:
        if variant.method != "nlsr":
            continue
        if variant.granularity == "neuron":
            name = anyfinetune.neuron_identify_name(variant)
            if name in seen:
                continue
            seen.add(name)
            form = "model" if init == "full" else "adapter"
            stages.append(Stage(name, anyfinetune.run_identify_neuron(variant, form),
                                {**common, "realign": realign_section, "beta": variant.beta,
                                 "scale_both": variant.scale_both, "rho": variant.rho, "q": variant.q,
                                 "granularity": "neuron", "reference": form},
                                ["data-align", "align_sft", merged if form == "model" else "align_dpo"]))
            continue
        ident = realign.identify_id(variant)
        if ident in seen:
            continue
        seen.add(ident)
        stages.append(Stage(f"identify-{ident}", realign.run_identify(variant),
                            {**common, "realign": realign_section, "beta": variant.beta,
                             "scale_both": variant.scale_both, "rho": variant.rho, "q": variant.q,
                             "masks": variant.masks}, ["data-align", "align_sft", "align_dpo"]))
    if cfg.defences:
        stages.append(Stage("data-defences", data.run_defence_rows,
                            {**data_common, "sft": sections["align"]["sft"], "realign": realign_section,
                             "defence_safety_n": cfg.defence_safety_n, "gate": gate}, ["data-align"],
                            content=reads.defence_content))
    aligned_stage_of, weak_stage_of = {}, {}
    for defence in cfg.defences:
        aligned_stage_of[defence.name], weak_stage_of[defence.name] = "align_dpo", "align_sft"
        if defence.method == "vaccine":        # Vaccine changes the alignment: shared by every seed
            rho = 2.0 if defence.rho is None else defence.rho
            if "sft" in defence.vaccine_stages:
                weak_stage_of[defence.name] = f"align_sft-{defence.name}"
                stages.append(Stage(weak_stage_of[defence.name], align.run_sft_vaccine(rho),
                                    {**common, "defence": defence.model_dump(), "sft": sections["align"]["sft"],
                                     "lora": sections["lora"]}, sft_inputs))
            weak = weak_stage_of[defence.name]
            aligned_stage_of[defence.name] = f"align_dpo-{defence.name}"
            stages.append(Stage(aligned_stage_of[defence.name],
                                align.run_dpo_vaccine(rho) if "dpo" in defence.vaccine_stages else align.run_dpo,
                                {**common, "defence": defence.model_dump(), "dpo": sections["align"]["dpo"],
                                 "lora": sections["lora"], **dpo_pair_params}, ["data-align", weak, *dpo_extra_inputs],
                                roles={weak: "align_sft"}))

    from nlsr.evaluation.generation import resolve_backend

    generation = {k: v for k, v in sections["evaluate"].items() if k not in ("judges", "gold_labels")}
    generation["backend"] = resolve_backend(cfg.evaluate.backend)   # auto -> what runs here
    eval_params = {**common, "evaluate": generation, "task": cfg.attack.task}
    models: dict[str, dict] = {}

    def add_eval(label: str, base: str, adapter_stage: str, cost: list[str], seed: int | None,
                 roles: dict[str, str], weak: str = "align_sft") -> None:
        name = f"evaluate-{label}" + (f"-s{seed}" if cfg.seeds and seed is not None else "")
        on = {"weak": [weak], "merged": [merged]}.get(base, [])
        roles = {**roles, weak: "align_sft"} if weak != "align_sft" else roles
        inputs = ["data", *on, adapter_stage]
        role = roles.get(adapter_stage, adapter_stage)
        params = eval_params if seed is None else {**eval_params, "seed": seed}
        stages.append(Stage(name, evaluate.run_model(base, role), params, inputs, seed=seed, roles=roles))
        entry = models.setdefault(label, {"label": label, "evaluations": [], "seeds": [], "cost": []})
        entry["evaluations"].append(name)
        entry["seeds"].append(cfg.seed if seed is None else seed)
        entry["cost"].append(cost)

    if cfg.evaluate.evaluate_aligned:
        add_eval("aligned", "weak", "align_dpo", ["align_sft", "align_dpo"], None, {})
    eval_base = {"continue": "weak", "fresh": "merged", "full": "model"}[init]
    for seed in cfg.run_seeds:
        def per_seed(name: str, seed: int = seed) -> str:
            return f"{name}-s{seed}" if cfg.seeds else name

        seeded = {**common, "seed": seed}
        data_attack = per_seed("data-attack")
        roles = {data_attack: "data-attack"}
        stages.append(Stage(data_attack, data.run_attack_data,
                            {**data_common, "seed": seed, "attack": attack_data_params(sections), "gate": gate},
                            ["data-align"], seed=seed, content=reads.attack_content))
        attacked = per_seed("attack")
        if init == "continue":
            stages.append(Stage(attacked, attack.run_attack, {**seeded, "attack": attack_params(sections)},
                                [data_attack, "align_sft", "align_dpo"], seed=seed, roles=roles))
        else:
            stages.append(Stage(attacked, anyfinetune.run_attack_init(init),
                                {**seeded, "attack": attack_params(sections), **init_params(cfg)},
                                [data_attack, merged], seed=seed, roles=roles))
        add_eval("attacked", eval_base, attacked, [attacked], seed, {attacked: "attack"})
        if cfg.attack.benign_control:
            benign = per_seed("attack-p0")
            if init == "continue":
                stages.append(Stage(benign, attack.run_attack_from("align_dpo", benign=True),
                                    {**seeded, "attack": attack_params(sections), "benign": True},
                                    [data_attack, "align_sft", "align_dpo"], seed=seed, roles=roles))
            else:
                stages.append(Stage(benign, anyfinetune.run_attack_init(init, benign=True),
                                    {**seeded, "attack": attack_params(sections), **init_params(cfg),
                                     "benign": True}, [data_attack, merged], seed=seed, roles=roles))
            add_eval("attacked-p0", eval_base, benign, [benign], seed, {benign: "attack"})
        if cfg.attack.nonaligned_control:
            nonaligned = per_seed("attack_nonaligned")
            stages.append(Stage(nonaligned, attack.run_nonaligned,
                                {**seeded, "attack": attack_params(sections), "lora": sections["lora"]},
                                [data_attack], seed=seed, roles=roles))
            add_eval("nonaligned", "base", nonaligned, [nonaligned], seed, {nonaligned: "attack_nonaligned"})
        task_idents: set[str] = set()
        for variant in all_variants:
            name = per_seed(f"realign-{variant.name}")
            inputs = ["align_sft", "align_dpo", attacked]
            cost = [name]
            stage_roles: dict[str, str] = {}
            params = {**data_common, "seed": seed, "variant": variant_params(variant)}
            run = realign.run_variant(variant)          # entry-wise NLSR; SafeLoRA on adapters
            if init != "continue":
                inputs.append(merged)
                params["init"] = init
            if variant.method == "nlsr" and variant.granularity == "neuron":
                ident = anyfinetune.neuron_identify_name(variant)
                inputs.append(ident)
                cost.insert(0, ident)
                run = anyfinetune.run_realign(variant, init)
            elif variant.method == "nlsr":
                inputs.append(f"identify-{realign.identify_id(variant)}")
                cost.insert(0, f"identify-{realign.identify_id(variant)}")
                if variant.protect_task is not None:    # this seed's task masks, shared by the variants
                    task_ident = per_seed(realign.task_identify_name(variant))
                    if task_ident not in task_idents:
                        task_idents.add(task_ident)
                        task_params = ({"score": "fisher"} if variant.protect_task_score == "fisher"
                                       else {"rho": variant.rho, "q": variant.protect_task})
                        stages.append(Stage(task_ident, realign.run_identify_task(variant),
                                            {**common, "seed": seed, "realign": realign_section, **task_params,
                                             "n": variant.task_calibration_n, "task": cfg.attack.task},
                                            [data_attack, "align_sft", attacked], seed=seed,
                                            roles={**roles, attacked: "attack"},
                                            content=reads.task_calibration_content))
                    inputs.append(task_ident)
                    cost.insert(1, task_ident)
                    stage_roles[task_ident] = "identify-task"
            elif init == "full":                        # SafeLoRA's full-parameter form
                run = anyfinetune.run_realign(variant, init)
            stages.append(Stage(name, run, params, inputs, seed=seed, roles={attacked: "attack", **stage_roles}))
            add_eval(variant.name, eval_base, name, cost, seed, {name: f"realign-{variant.name}"})
        for defence in cfg.defences:
            aligned_stage, weak = aligned_stage_of[defence.name], weak_stage_of[defence.name]
            name = per_seed(f"attack-{defence.name}")
            run = (attack.run_attack_from(aligned_stage) if defence.method == "vaccine"
                   else attack.run_attack_from("align_dpo", defence))
            stages.append(Stage(name, run, {**seeded, "defence": defence.model_dump(),
                                            "attack": attack_params(sections)},
                                [data_attack, "data-defences", weak, aligned_stage], seed=seed,
                                roles={**roles, weak: "align_sft"}))
            cost = [name]
            if defence.method == "vaccine":
                cost = [*([weak] if weak != "align_sft" else []), aligned_stage, name]
            add_eval(defence.name, "weak", name, cost, seed, {name: f"attack-{defence.name}"}, weak=weak)
    entries = list(models.values())
    needed = sorted({s for m in entries for s in m["evaluations"] + [c for cost in m["cost"] for c in cost]})
    stages.append(Stage("report", report.run(entries),
                        {"models": entries, "judges": sections["evaluate"]["judges"],
                         "gold_labels": _file_fingerprint(cfg.evaluate.gold_labels),
                         "sweep": sections["realign"]["sweep"],
                         "judge_version": default_dir().name}, needed, content=reads.judge_content))
    return stages


def _file_fingerprint(path: str | None) -> str | None:
    """``path`` and its content hash (the report must rerun when the gold labels change)."""
    if path is None:
        return None
    from nlsr.io import file_sha256

    file = Path(path)
    return f"{path}:{file_sha256(file)[:16]}" if file.is_file() else f"{path}:missing"


def run_experiment(cfg: ExperimentConfig, force: set[str] | None = None,
                   data: str | Path | None = None, log=print, until: str | None = None,
                   accept_code_change: bool = False) -> Path:
    """Run (or resume) every stage of ``cfg``; returns the run directory."""
    ctx = RunContext(config=cfg, run_dir=Path(cfg.runs_dir) / cfg.name,
                     data_dir=data_dir(data if data is not None else cfg.data_dir))
    reuse = [Path(r) for r in cfg.reuse_from]
    missing = [str(r) for r in reuse if not r.is_dir()]
    if missing:
        raise NlsrError(f"reuse_from names run folders that do not exist: {missing}; fix the paths or drop them")
    log(f"[machine] {ctx.precision.line()}")
    run_stages(ctx, build_stages(cfg), force=force, log=log, reuse_from=reuse, until=until,
               accept_code_change=accept_code_change)
    return ctx.run_dir
