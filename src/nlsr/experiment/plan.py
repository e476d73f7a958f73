"""From an :class:`ExperimentConfig` to the ordered stage graph, and the entry point ``run_experiment``.

A stage's key is its parameters (the config sections it reads, as dumped, and the settings shared by
every stage), the keys of its inputs, what it reads besides them and the code commit
(:mod:`nlsr.experiment.pipeline`). Each builder below returns the stages of one part of the
experiment; :func:`build_stages` chains them in dependency order."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.experiment.config import DEFENCE_ALIGNED_PREFIX, DefenceSection, ExperimentConfig, VariantSection
from nlsr.experiment.pipeline import RunContext, Stage, run_stages
from nlsr.paths import data_dir, describe_data_dir

# realign settings only the report reads (in its key, not in the key of any stage that repairs)
REPORT_ONLY = ("controls_summary", "equal_fa_costs", "equal_fa_against")


def evaluation_data_params(sections: dict, task: str) -> dict:
    """The settings that change the evaluation sets (and so the disjointness gate)."""
    ev = sections["evaluate"]
    keys = ("harmful_dataset", "harmful_n", "validation_fraction", "extra_harmful", "extra_harmful_n",
            "task_n", "xstest_n", "xstest_validation_n")
    return {"evaluate": {k: ev[k] for k in keys}, "task": task}


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


@dataclass
class Plan:
    """What the builders share: the config, its sections as dumped, the parameters common to stages,
    and the models the report compares (filled by :func:`evaluation_stage`)."""

    cfg: ExperimentConfig
    sections: dict
    data_common: dict
    """Model, template and seed: in every stage's key."""
    common: dict
    """``data_common`` and the precision: in the key of every stage that runs a model (a float32 run
    never reuses bf16 stages)."""
    eval_params: dict
    models: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Plan:
        from nlsr.evaluation.generation import resolve_backend
        from nlsr.precision import resolve_precision

        sections = cfg.model_dump()
        data_common = {"model": cfg.model, "template": cfg.template, "seed": cfg.seed}
        common = {**data_common, "precision": resolve_precision(cfg.precision, cfg.device).dtype}
        generation = {k: v for k, v in sections["evaluate"].items() if k not in ("judges", "gold_labels")}
        generation["backend"] = resolve_backend(cfg.evaluate.backend)   # auto -> what runs here
        return cls(cfg, sections, data_common, common, {**common, "evaluate": generation, "task": cfg.attack.task})

    @cached_property
    def gate(self) -> dict:
        """See :func:`gate_params`."""
        return gate_params(self.sections)

    @property
    def realign_section(self) -> dict:
        """The realign section without its variants, sweeps and report settings (what identification reads)."""
        return {k: v for k, v in self.sections["realign"].items()
                if k not in ("variants", "sweep", "sweeps") + REPORT_ONLY}

    def variants(self) -> list[VariantSection]:
        """The listed variants, then those the sweeps add."""
        return list(self.cfg.realign.variants) + self.cfg.realign.swept_variants()

    def per_seed(self, name: str, seed: int) -> str:
        """``name`` of a per-seed stage: ``<name>-s<seed>`` when ``seeds`` is set."""
        return f"{name}-s{seed}" if self.cfg.seeds else name

    def sft_inputs(self) -> list[str]:
        return ["data-align", *(["data-helpful"] if self.cfg.align.helpful.n else [])]

    def dpo_inputs(self, weak: str = "align_sft") -> list[str]:
        helpful_pairs = self.cfg.align.helpful.n and self.cfg.align.helpful.dpo_pairs
        return ["data-align", weak, *(["data-helpful"] if helpful_pairs else []),
                *(["data-refusal-pairs"] if self.cfg.align.dpo.refusal_pairs else [])]

    def dpo_params(self) -> dict:
        """The DPO stages' parameters: the DPO and LoRA sections, and the helpful pairs used."""
        helpful = self.cfg.align.helpful
        return {**self.common, "dpo": self.sections["align"]["dpo"], "lora": self.sections["lora"],
                "helpful_dpo_pairs": helpful.dpo_pairs if helpful.n else 0}


def data_stages(plan: Plan) -> list[Stage]:
    """The evaluation sets, the alignment data and, where configured, the refusal pairs and the base
    model's helpful answers."""
    from nlsr.experiment.stages import align, data, reads

    cfg, sections, data_common = plan.cfg, plan.sections, plan.data_common
    stages = [
        Stage("data", data.run_eval, {**data_common, **evaluation_data_params(sections, cfg.attack.task)},
              content=reads.eval_content),
        Stage("data-align", data.run_align, {**data_common, **align_data_params(sections), "gate": plan.gate},
              content=reads.align_content),
    ]
    dpo = cfg.align.dpo
    if dpo.refusal_pairs:
        stages.append(Stage("data-refusal-pairs", data.run_refusal_pairs,
                            {**data_common, "refusal_pairs": dpo.refusal_pairs, "dataset": dpo.refusal_pairs_dataset},
                            ["data-align"], content=reads.refusal_pairs_content))
    if cfg.align.helpful.n:     # the answers do not depend on how many DPO pairs are drawn from them
        helpful = cfg.align.helpful.model_dump(exclude={"dpo_pairs"})
        stages.append(Stage("data-helpful", align.run_helpful_answers, {**plan.common, "helpful": helpful},
                            ["data-align"]))
    return stages


def alignment_stages(plan: Plan) -> list[Stage]:
    """SFT (merged into W_0), DPO (the aligned adapter) and, for ``attack.init`` fresh or full, the
    merged aligned model W_a shared by every seed."""
    from nlsr.experiment.stages import align, anyfinetune

    stages = [Stage("align_sft", align.run_sft,
                    {**plan.common, "sft": plan.sections["align"]["sft"], "lora": plan.sections["lora"]},
                    plan.sft_inputs()),
              Stage("align_dpo", align.run_dpo, plan.dpo_params(), plan.dpo_inputs())]
    if plan.cfg.attack.init != "continue":
        stages.append(Stage(anyfinetune.MERGED, anyfinetune.run_merge_aligned,
                            {**plan.data_common, "merge": "W_0 + ΔW_a"}, ["align_sft", "align_dpo"]))
    return stages


def identification_stages(plan: Plan) -> list[Stage]:
    """One identification (ExPO reference and safety masks) per distinct setting of the NLSR
    variants; ``granularity: neuron`` variants get their own (``identify-...-neuron``)."""
    from nlsr.experiment.stages import anyfinetune, realign

    init = plan.cfg.attack.init
    stages: dict[str, Stage] = {}
    for variant in plan.variants():
        if variant.method != "nlsr":
            continue
        shared = {**plan.common, "realign": plan.realign_section, "beta": variant.beta,
                  "scale_both": variant.scale_both, "rho": variant.rho, "q": variant.q}
        if variant.granularity == "neuron":
            name = anyfinetune.neuron_identify_name(variant)
            form = "model" if init == "full" else "adapter"
            stage = Stage(name, anyfinetune.run_identify_neuron(variant, form),
                          {**shared, "granularity": "neuron", "reference": form},
                          ["data-align", "align_sft", anyfinetune.MERGED if form == "model" else "align_dpo"])
        else:
            name = f"identify-{realign.identify_id(variant)}"
            stage = Stage(name, realign.run_identify(variant), {**shared, "masks": variant.masks},
                          ["data-align", "align_sft", "align_dpo"])
        stages.setdefault(name, stage)
    return list(stages.values())


def defence_alignment_stages(plan: Plan) -> list[Stage]:
    """The defences' safety rows and, for Vaccine, its perturbation-aware alignment (shared by every
    seed): ``align_sft-<name>`` (when it covers the SFT) and ``align_dpo-<name>``."""
    from nlsr.experiment.stages import align, data, reads

    if not plan.cfg.defences:
        return []
    sections = plan.sections
    stages = [Stage("data-defences", data.run_defence_rows,
                    {**plan.data_common, "sft": sections["align"]["sft"], "realign": plan.realign_section,
                     "defence_safety_n": plan.cfg.defence_safety_n, "gate": plan.gate}, ["data-align"],
                    content=reads.defence_content)]
    for defence in plan.cfg.defences:
        if not changes_alignment(defence):
            continue
        rho = 2.0 if defence.rho is None else defence.rho
        aligned, weak = defence_alignment(defence)
        params = {**plan.common, "defence": defence.model_dump()}
        if "sft" in defence.vaccine_stages:
            stages.append(Stage(weak, align.run_sft_vaccine(rho), {**params, "sft": sections["align"]["sft"],
                                                                   "lora": sections["lora"]}, plan.sft_inputs()))
        run = align.run_dpo_vaccine(rho) if "dpo" in defence.vaccine_stages else align.run_dpo
        stages.append(Stage(aligned, run, {**plan.dpo_params(), **params}, plan.dpo_inputs(weak),
                            roles={weak: "align_sft"}))
    return stages


def defence_aligned_evaluations(plan: Plan) -> list[Stage]:
    """``evaluate-aligned-<name>``: a defence that changes the alignment (Vaccine) evaluated before the
    attack, as the shared aligned model is, so that its own alignment's safety and over-refusal are
    known beside what the attack leaves of them."""
    stages = []
    for defence in plan.cfg.defences:
        if changes_alignment(defence):
            aligned, weak = defence_alignment(defence)
            stages.append(evaluation_stage(plan, f"{DEFENCE_ALIGNED_PREFIX}{defence.name}", "weak", aligned,
                                           [weak, aligned], None, {aligned: "align_dpo"}, weak=weak))
    return stages


def changes_alignment(defence: DefenceSection) -> bool:
    """A defence that hooks into the alignment (Vaccine), by its registration; the others change the
    fine-tuning."""
    from nlsr.training.defences import DEFENCES

    return DEFENCES.info(defence.method).meta.get("stage") == "alignment"


def defence_alignment(defence: DefenceSection) -> tuple[str, str]:
    """``(aligned stage, weak-model stage)`` a defence's attack continues: its own alignment stages for
    a defence that changes the alignment (Vaccine), the shared ones for the others."""
    if not changes_alignment(defence):
        return "align_dpo", "align_sft"
    weak = f"align_sft-{defence.name}" if "sft" in defence.vaccine_stages else "align_sft"
    return f"align_dpo-{defence.name}", weak


def evaluation_stage(plan: Plan, label: str, base: str, adapter_stage: str, cost: list[str], seed: int | None,
                     roles: dict[str, str], weak: str = "align_sft") -> Stage:
    """The evaluation of one model (``evaluate-<label>``, per seed), entered in the report's models
    with the stages whose time it cost."""
    from nlsr.experiment.stages import anyfinetune, evaluate

    name = f"evaluate-{label}" + (f"-s{seed}" if plan.cfg.seeds and seed is not None else "")
    on = {"weak": [weak], "merged": [anyfinetune.MERGED]}.get(base, [])
    roles = {**roles, weak: "align_sft"} if weak != "align_sft" else roles
    params = plan.eval_params if seed is None else {**plan.eval_params, "seed": seed}
    stage = Stage(name, evaluate.run_model(base, roles.get(adapter_stage, adapter_stage)), params,
                  ["data", *on, adapter_stage], seed=seed, roles=roles)
    entry = plan.models.setdefault(label, {"label": label, "evaluations": [], "seeds": [], "cost": []})
    entry["evaluations"].append(name)
    entry["seeds"].append(plan.cfg.seed if seed is None else seed)
    entry["cost"].append(cost)
    return stage


def eval_base(plan: Plan) -> str:
    """What an attacked model's adapter is evaluated on: W_0, the merged W_a, or none (a full model)."""
    return {"continue": "weak", "fresh": "merged", "full": "model"}[plan.cfg.attack.init]


def fine_tune_stage(plan: Plan, name: str, seed: int, benign: bool = False) -> Stage:
    """This seed's attack (``benign``: its p = 0 control) under ``attack.init``: the aligned LoRA
    continued on W_0, or a fresh LoRA / every weight of the merged W_a."""
    from nlsr.experiment.stages import anyfinetune, attack

    init = plan.cfg.attack.init
    data_attack = plan.per_seed("data-attack", seed)
    params = {**plan.common, "seed": seed, "attack": plan.sections["attack"], "lora": plan.sections["lora"],
              **({"benign": True} if benign else {})}
    if init == "continue":
        run = attack.run_attack_from("align_dpo", benign=True) if benign else attack.run_attack
        inputs = [data_attack, "align_sft", "align_dpo"]
    else:
        run, inputs = anyfinetune.run_attack_init(init, benign=benign), [data_attack, anyfinetune.MERGED]
    return Stage(name, run, params, inputs, seed=seed, roles={data_attack: "data-attack"})


def attack_stages(plan: Plan, seed: int) -> list[Stage]:
    """This seed's fine-tuning data, the attack, its p = 0 and non-aligned controls, and their
    evaluations."""
    from nlsr.experiment.stages import attack, data, reads

    cfg, sections = plan.cfg, plan.sections
    data_attack = plan.per_seed("data-attack", seed)
    stages = [Stage(data_attack, data.run_attack_data,
                    {**plan.data_common, "seed": seed, "attack": attack_data_params(sections), "gate": plan.gate},
                    ["data-align"], seed=seed, content=reads.attack_content)]
    runs = [("attack", "attacked", False)] + ([("attack-p0", "attacked-p0", True)] if cfg.attack.benign_control else [])
    for name, label, benign in runs:
        stage = fine_tune_stage(plan, plan.per_seed(name, seed), seed, benign)
        stages += [stage, evaluation_stage(plan, label, eval_base(plan), stage.name, [stage.name], seed,
                                           {stage.name: "attack"})]
    if cfg.attack.nonaligned_control:
        nonaligned = plan.per_seed("attack_nonaligned", seed)
        stages.append(Stage(nonaligned, attack.run_nonaligned,
                            {**plan.common, "seed": seed, "attack": sections["attack"], "lora": sections["lora"]},
                            [data_attack], seed=seed, roles={data_attack: "data-attack"}))
        stages.append(evaluation_stage(plan, "nonaligned", "base", nonaligned, [nonaligned], seed,
                                       {nonaligned: "attack_nonaligned"}))
    return stages


def task_identification_stage(plan: Plan, variant: VariantSection, seed: int) -> Stage:
    """``protect_task``'s task masks (or Fisher information) of this seed's fine-tune."""
    from nlsr.experiment.stages import reads, realign

    data_attack, attacked = plan.per_seed("data-attack", seed), plan.per_seed("attack", seed)
    task = {"score": variant.protect_task_score}     # Fisher reads no ρ or fraction: shared across them
    if variant.protect_task_score == "magnitude":
        task |= {"rho": variant.rho, "q": variant.protect_task}
    return Stage(plan.per_seed(realign.task_identify_name(variant), seed), realign.run_identify_task(variant),
                 {**plan.common, "seed": seed, "realign": plan.realign_section, **task,
                  "n": variant.task_calibration_n, "task": plan.cfg.attack.task},
                 [data_attack, "align_sft", attacked], seed=seed,
                 roles={data_attack: "data-attack", attacked: "attack"}, content=reads.task_calibration_content)


def antidote_scores_stage(plan: Plan, variant: VariantSection, seed: int) -> Stage:
    """Antidote's harmful rows and the fine-tune's activation norms on them (per seed and row count)."""
    from nlsr.experiment.stages import reads, realign

    data_attack, attacked = plan.per_seed("data-attack", seed), plan.per_seed("attack", seed)
    return Stage(plan.per_seed(realign.antidote_stage_name(variant), seed), realign.run_antidote_scores(variant),
                 {**plan.common, "seed": seed, "realign": plan.realign_section, "n": variant.antidote_n,
                  "poison_dataset": plan.cfg.attack.poison_dataset, "gate": plan.gate},
                 ["data-align", data_attack, "align_sft", attacked], seed=seed,
                 roles={data_attack: "data-attack", attacked: "attack"}, content=reads.antidote_content)


def identification_of(variant: VariantSection) -> str | None:
    """The identification stage an NLSR variant reads (None for SafeLoRA)."""
    from nlsr.experiment.stages import anyfinetune, realign

    if variant.method != "nlsr":
        return None
    if variant.granularity == "neuron":
        return anyfinetune.neuron_identify_name(variant)
    return f"identify-{realign.identify_id(variant)}"


def repair_stages(plan: Plan, variant: VariantSection, seed: int, task_stage: str | None) -> list[Stage]:
    """This seed's repair by ``variant`` and its evaluation: NLSR at entry granularity, SafeLoRA, RESTA
    and Antidote on adapters; NLSR at neuron granularity, and SafeLoRA after a full fine-tune, in their
    own form. ``task_stage``: the stage it reads besides the identification (``protect_task``'s task
    masks, Antidote's activation norms)."""
    from nlsr.experiment.stages import anyfinetune, realign

    init = plan.cfg.attack.init
    name, attacked = plan.per_seed(f"realign-{variant.name}", seed), plan.per_seed("attack", seed)
    before = [s for s in (identification_of(variant), task_stage) if s is not None]
    inputs = ["align_sft", "align_dpo", attacked, *([anyfinetune.MERGED] if init != "continue" else []), *before]
    own_form = (variant.method == "nlsr" and variant.granularity == "neuron") or (
        variant.method != "nlsr" and init == "full")
    run = anyfinetune.run_realign(variant, init) if own_form else realign.run_variant(variant)
    extra_role = "antidote-scores" if variant.method == "antidote" else "identify-task"
    roles = {attacked: "attack", **({task_stage: extra_role} if task_stage else {})}
    params = {**plan.data_common, "seed": seed, "variant": variant.key_params(), "init": init}
    return [Stage(name, run, params, inputs, seed=seed, roles=roles),
            evaluation_stage(plan, variant.name, eval_base(plan), name, [*before, name], seed,
                             {name: f"realign-{variant.name}"})]


def realign_stages(plan: Plan, seed: int) -> list[Stage]:
    """This seed's repairs by every variant, after the task masks of those that protect the task
    (one stage per setting, shared by the variants)."""
    stages: list[Stage] = []
    for variant in plan.variants():
        task = task_identification_stage(plan, variant, seed) if variant.protect_task is not None else None
        if variant.method == "antidote":
            task = antidote_scores_stage(plan, variant, seed)
        if task is not None and task.name not in {s.name for s in stages}:
            stages.append(task)
        stages += repair_stages(plan, variant, seed, task.name if task else None)
    return stages


def defence_attack_stages(plan: Plan, seed: int) -> list[Stage]:
    """This seed's attack under each defence, and its evaluation."""
    from nlsr.experiment.stages import attack

    data_attack = plan.per_seed("data-attack", seed)
    stages = []
    for defence in plan.cfg.defences:
        aligned, weak = defence_alignment(defence)
        name = plan.per_seed(f"attack-{defence.name}", seed)
        vaccine = changes_alignment(defence)       # Vaccine changed the alignment; the others the fine-tune
        run = attack.run_attack_from(aligned) if vaccine else attack.run_attack_from("align_dpo", defence)
        stages.append(Stage(name, run, {**plan.common, "seed": seed, "defence": defence.model_dump(),
                                        "attack": plan.sections["attack"]},
                            [data_attack, "data-defences", weak, aligned], seed=seed,
                            roles={data_attack: "data-attack", weak: "align_sft"}))
        cost = [*([weak] if weak != "align_sft" else []), aligned, name] if vaccine else [name]
        stages.append(evaluation_stage(plan, defence.name, "weak", name, cost, seed, {name: f"attack-{defence.name}"},
                                       weak=weak))
    return stages


def report_stage(plan: Plan) -> Stage:
    """The report over every evaluated model; it needs their evaluations and the stages they cost."""
    from nlsr.evaluation.judges.training import default_dir  # its name versions the trained judge
    from nlsr.experiment.stages import reads, report

    entries = list(plan.models.values())
    needed = sorted({s for m in entries for s in m["evaluations"] + [c for cost in m["cost"] for c in cost]})
    return Stage("report", report.run(entries),
                 {"models": entries, "judges": plan.sections["evaluate"]["judges"],
                  "gold_labels": _file_fingerprint(plan.cfg.evaluate.gold_labels),
                  "sweep": plan.sections["realign"]["sweep"], "judge_version": default_dir().name,
                  **({"sweeps": plan.sections["realign"]["sweeps"]} if plan.cfg.realign.sweeps else {}),
                  **({k: plan.sections["realign"][k] for k in REPORT_ONLY}
                     if plan.cfg.realign.controls_summary else {})},
                 needed, content=reads.judge_content)


def build_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The experiment's stages in dependency order.

    The data, the alignment and the identification run once; the attack and everything after it
    run once per seed of ``cfg.run_seeds`` (stage names get ``-s<seed>`` when ``seeds`` is set).
    ``attack.init`` picks the threat model: ``continue`` (the aligned LoRA on W_0, the paper),
    ``fresh`` (a fresh LoRA on the merged aligned model W_a) or ``full`` (every weight of W_a)."""
    plan = Plan.of(cfg)
    stages = [*data_stages(plan), *alignment_stages(plan), *identification_stages(plan),
              *defence_alignment_stages(plan)]
    if cfg.evaluate.evaluate_aligned:
        stages.append(evaluation_stage(plan, "aligned", "weak", "align_dpo", ["align_sft", "align_dpo"], None, {}))
        stages += defence_aligned_evaluations(plan)
    for seed in cfg.run_seeds:
        stages += [*attack_stages(plan, seed), *realign_stages(plan, seed), *defence_attack_stages(plan, seed)]
    return [*stages, report_stage(plan)]


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
    log(f"[data] {describe_data_dir(ctx.data_dir)}")
    run_stages(ctx, build_stages(cfg), force=force, log=log, reuse_from=reuse, until=until,
               accept_code_change=accept_code_change)
    return ctx.run_dir
