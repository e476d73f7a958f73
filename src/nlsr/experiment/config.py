"""The experiment configuration: typed, frozen, checked when it is loaded (before any training)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from nlsr.errors import NlsrError
from nlsr.evaluation.judges import JUDGES
from nlsr.method import DEFAULT_Q, DEFAULT_TRANSPLANT, SELECTION_RULES, TRANSPLANTS
from nlsr.registry import Entry, Registry
from nlsr.training.defences import DEFENCES
from nlsr.training.settings import DpoSection, LoraSection, SftSection, TrainSection
from nlsr.training.settings import Section as _Section


def folder_name(value: str, what: str) -> str:
    """``value`` if it can name one folder: no path separators, not '.' or '..', not empty."""
    if (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")
            or value != value.strip()):
        raise ValueError(f"{what} '{value}' must be a single folder name (no '/', '\\', '..', "
                         "surrounding spaces or empty name), since it names a folder of the run")
    return value


def _known(registry: Registry, name: str) -> Entry:
    """The entry of ``name`` in ``registry`` (no import), or a ValueError pydantic reports with its field."""
    try:
        return registry.info(name)
    except NlsrError as err:
        raise ValueError(str(err)) from None


class HelpfulSection(_Section):
    """Helpful rows mixed into the SFT set: harmless instructions answered by the base model itself
    (greedy, in a data stage), so alignment adds refusals without teaching a new style or a blanket
    refusal."""

    n: int = Field(0, ge=0, description="Harmless instructions answered by the base model (0 = none).")
    dataset: str = Field("harmless_instructions", description="Registry name of harmless prompts.")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    dpo_pairs: int = Field(
        0, ge=0, description="Also add this many DPO pairs on harmless prompts: chosen = the base model's "
                             "own helpful answer, rejected = a refusal (one of the SFT refusals), so the DPO "
                             "adapter learns where not to refuse as well as where to refuse (0 = none).")


class AlignSection(_Section):
    sft: SftSection = SftSection()
    dpo: DpoSection = DpoSection()
    helpful: HelpfulSection = HelpfulSection()


class AttackSection(TrainSection):
    """The harmful fine-tuning attack on task data with a fraction p of harmful rows: continue the
    aligned LoRA (``init``, the paper), or fine-tune the merged aligned model with a fresh LoRA or in
    full; optionally also a fresh LoRA on the base model (non-aligned control)."""

    task: Literal["sst2", "ag_news", "gsm8k"] = "sst2"
    n: int = Field(1000, gt=0)
    p: float = Field(0.05, description="Fraction of harmful rows.")
    source: Literal["build", "ready_made"] = Field(
        "build", description="Build the poisoned set from task + poison rows, or use the authors' "
                             "train_merged_n1000_p* file.")
    poison_dataset: str = "poison"
    nonaligned_control: bool = True
    benign_control: bool = Field(
        False, description="Also fine-tune on the same task rows without the harmful ones (p = 0), so the "
                           "table shows what the harmful rows add on top of task fine-tuning.")
    init: Literal["continue", "fresh", "full"] = Field(
        "continue", description="The threat model: 'continue' the aligned LoRA on W_0 (the paper); a 'fresh' "
                                "LoRA on the merged aligned model W_0 + ΔW_a (a fine-tuning service); a 'full' "
                                "fine-tune of every weight of the merged aligned model.")
    fresh_r: int | None = Field(None, gt=0, description="init=fresh: rank of the fresh LoRA (default: lora.r).")
    fresh_alpha: float | None = Field(None, gt=0, description="init=fresh: its alpha (default: lora.alpha).")
    full_lr: float | None = Field(
        None, gt=0, description="init=full: learning rate of the full fine-tune (default: lr, which suits a "
                                "LoRA; full fine-tunes usually take about ten times less).")

    @field_validator("p")
    @classmethod
    def _p_in_unit_interval(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"p must be in [0, 1] (got {value})")
        return value


SWEEP_NAME = "{variant}-{field}{value}"


def sweep_name(variant: str, field: str, value: float | int | str, template: str = SWEEP_NAME) -> str:
    """The name of a swept variant, e.g. ``nlsr-q0.1`` (``template``: ``{variant}``, ``{field}`` and
    ``{value}``, floats written with ``:g``; ``exact-q{value}`` gives ``exact-q0.1``)."""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return template.format(variant=variant, field=field, value=shown)


NLSR_ONLY_FIELDS = ("beta", "scale_both", "rho", "q", "masks", "reference", "select", "transplant", "p_base",
                    "epsilon", "seed", "protect_task", "protect_task_score", "task_calibration_n", "granularity")
"""Variant settings that only NLSR reads (left out of the other methods' stage keys)."""


class VariantSection(_Section):
    """One post-hoc realignment to compare: NLSR (with its knobs and controls), SafeLoRA, RESTA or
    Antidote."""

    name: str
    method: Literal["nlsr", "safelora", "resta", "antidote"] = Field(
        "nlsr", description="nlsr; safelora (project B onto the alignment direction); resta (add the aligned "
                            "adapter's update back, γ ΔW_a: nlsr.method.resta); antidote (prune the fine-tune's "
                            "factor entries most salient on harmful answers: nlsr.method.antidote).")
    beta: float = Field(0.9, ge=0, description="ExPO extrapolation strength.")
    scale_both: bool = False
    rho: float = Field(0.8, gt=0, le=1, description="Rank ratio of the kept subspace.")
    q: float = Field(DEFAULT_Q, gt=0, le=1, description="Fraction of entries marked safety-critical.")
    masks: Literal["identified", "random", "magnitude"] = Field(
        "identified", description="Controls of the identification: 'random' = random entries of the same "
                                  "density; 'magnitude' = the top q of |A_e|, |B_e| with no projection on the "
                                  "safety activations.")
    reference: Literal["expo", "self"] = Field(
        "expo", description="NLSR (entry granularity): what is transplanted inside the masks. 'expo' = the "
                            "ExPO reference (the method); 'self' = the fine-tune's own factors (a pure-erasure "
                            "control with no safety information: the masks are still the ones identified on "
                            "the ExPO reference, so the variant differs from the real one only in what fills "
                            "them; with the exact form it measures what dropping the cross terms alone does).")
    gamma: float = Field(1.0, ge=0, description="RESTA: the multiple of the aligned update added back, "
                                                "ΔW_t + γ ΔW_a (1 = the paper's single addition).")
    sparsity: float = Field(0.05, gt=0, lt=1, description="Antidote: the fraction of each fine-tuned factor's "
                                                          "entries pruned (largest Wanda score on harmful answers).")
    antidote_n: int = Field(64, gt=0, description="Antidote: harmful (prompt, answer) rows the scores come from: "
                                                  "poison-pool rows the attack did not use, gated like the rest.")
    select: str = "paper"
    transplant: str = DEFAULT_TRANSPLANT
    threshold: float | None = None
    p_base: float = 0.5
    epsilon: float = 0.2
    seed: int = 0
    num_modules: int | None = Field(None, gt=0, description="SafeLoRA: project the K least similar modules.")
    direction: Literal["alignment", "dpo"] = Field(
        "alignment", description="SafeLoRA's alignment direction V: 'alignment' = the whole alignment, "
                                 "W_0 + ΔW_dpo - W_base (the SFT merged into W_0 included); 'dpo' = the DPO "
                                 "adapter's delta alone.")
    ibm_conventions: bool = Field(
        False, description="SafeLoRA: IBM's reference rules (cosines rounded to 5 decimals, projected at <= "
                           "threshold, top-k ties projected).")
    protect_task: float | None = Field(
        None, gt=0, le=1,
        description="NLSR (entry granularity): leave out of the transplant the entries that are task-critical "
                    "in the fine-tuned adapter: the top fraction of its factors projected on the activations "
                    "of clean task rows (the paper's identification applied to the task). None: the paper.")
    protect_task_score: Literal["magnitude", "fisher"] = Field(
        "magnitude", description="protect_task: which entries count as task-critical. 'magnitude': the top "
                                 "fraction of the fine-tuned factors projected on the task activations (the "
                                 "paper's identification run on the task); 'fisher': the top fraction by the "
                                 "task loss moving the entry to the reference would cost, ½ F (e - t)² with "
                                 "the diagonal Fisher F on the clean task rows.")
    task_calibration_n: int = Field(
        128, gt=0, description="protect_task: clean task rows (the task's training set, disjoint from the "
                               "fine-tuning rows and every evaluation set) the task-critical entries come from.")
    granularity: Literal["entry", "neuron"] = Field(
        "entry", description="NLSR: 'entry' compares LoRA factors entry by entry (only for attack.init="
                             "continue); 'neuron' compares weight rows (any fine-tune: continue, fresh, full).")

    @field_validator("name")
    @classmethod
    def _name_is_folder(cls, value: str) -> str:
        return folder_name(value, "variant name")

    def key_params(self) -> dict:
        """The settings that make this variant's stage key: all of them for NLSR; for SafeLoRA, RESTA and
        Antidote, all but NLSR's own knobs (:data:`NLSR_ONLY_FIELDS`), so that a change of an NLSR
        default (the transplant form, say) does not rerun the other methods."""
        params = self.model_dump()
        if self.method != "nlsr":
            for field in NLSR_ONLY_FIELDS:
                params.pop(field)
        return params

    @model_validator(mode="after")
    def _rules(self) -> VariantSection:
        if self.method == "nlsr":
            _known(SELECTION_RULES, self.select)
            _known(TRANSPLANTS, self.transplant)
            if self.select == "threshold" and self.threshold is None:
                raise ValueError("select='threshold' needs a threshold")
        elif self.method == "safelora" and (self.threshold is None) == (self.num_modules is None):
            raise ValueError("safelora needs exactly one of threshold or num_modules")
        elif self.method in ("resta", "antidote") and (self.threshold is not None or self.num_modules is not None):
            raise ValueError(f"variant '{self.name}': {self.method} takes no threshold or num_modules (its knob "
                             f"is {'gamma' if self.method == 'resta' else 'sparsity'})")
        if self.method != "nlsr" and (self.masks != "identified" or self.reference != "expo"):
            raise ValueError(f"variant '{self.name}': masks and reference are NLSR settings; drop them from "
                             f"this {self.method} variant")
        if self.reference == "self" and self.granularity != "entry":
            raise ValueError(f"variant '{self.name}': reference: self transplants the fine-tune's own factors "
                             "entry by entry; it needs granularity: entry")
        if self.granularity == "neuron" and self.method != "nlsr":
            raise ValueError(f"variant '{self.name}': granularity is an NLSR setting; drop 'granularity: "
                             "neuron' from this safelora variant (SafeLoRA takes whatever the attack wrote)")
        if self.protect_task is not None and (self.method != "nlsr" or self.granularity != "entry"):
            raise ValueError(f"variant '{self.name}': protect_task is an option of NLSR at entry granularity; "
                             "drop it from this variant")
        if self.granularity == "neuron" and self.masks != "identified":
            raise ValueError(f"variant '{self.name}': {self.masks} masks exist at entry granularity only; use "
                             "masks: identified with granularity: neuron")
        return self


SWEEP_FIELDS = ("beta", "rho", "q", "select", "transplant", "threshold", "num_modules", "protect_task", "seed",
                "gamma", "sparsity")


class SweepSection(_Section):
    """A small sweep of one knob of one variant, scored on the validation prompts: every value adds a
    variant (named by ``name``, by default ``<variant>-<field><value>``); the report plots validation HS
    and FA against the value and names the value it would choose (tables report the test prompts)."""

    variant: str = Field(description="The variant whose knob is swept (its other settings are kept).")
    field: Literal["beta", "rho", "q", "select", "transplant", "threshold", "num_modules", "protect_task", "seed",
                   "gamma", "sparsity"]
    values: list[float | int | str] = Field(min_length=1)
    name: str = Field(SWEEP_NAME, description="The swept variants' names: a template with {value} and optionally "
                                              "{variant} and {field}, e.g. 'exact-q{value}' or "
                                              "'select-random-s{value}' (floats written with :g).")
    max_fa_drop: float = Field(2.0, ge=0, description="The choice: lowest validation HS among the values whose "
                                                      "validation FA is within this many points of the "
                                                      "attacked model's.")

    def label(self) -> str:
        """The curve's label: the name template with its value left out (``exact-q``, ``resta-g``)."""
        return self.name.format(variant=self.variant, field=self.field, value="").strip("-")

    @field_validator("name")
    @classmethod
    def _name_template(cls, value: str) -> str:
        if "{value}" not in value:
            raise ValueError(f"sweep name '{value}' must contain {{value}} (each swept variant needs its own name)")
        try:
            value.format(variant="v", field="f", value="1")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"sweep name '{value}' may only use {{variant}}, {{field}} and {{value}} "
                             f"({err})") from None
        return value


class RealignSection(_Section):
    calibration_dataset: str = Field("safety_sft", description="Rows disjoint from the SFT rows are used.")
    calibration_n: int = Field(256, gt=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(512, gt=8)
    variants: list[VariantSection] = Field(default_factory=lambda: [VariantSection(name="nlsr")])
    sweep: SweepSection | None = None
    sweeps: list[SweepSection] = Field(
        default_factory=list, description="Further sweeps (each like 'sweep'), so that many variants trace their "
                                          "own curves, e.g. every transplant form across q.")
    controls_summary: bool = Field(
        False, description="The report adds to summary.json every variant's HS, refusal, FA and XSTest refusal "
                           "with its q, form, modules repaired and self-transplant change, and the default "
                           "(form, q) chosen on validation (nlsr.experiment.frontier).")
    equal_fa_costs: list[float] = Field(
        default_factory=lambda: [2.0, 5.0, 10.0],
        description="With controls_summary: every curve is read at these FA costs (points below the attacked "
                    "model, test split), so that methods are compared at equal cost "
                    "(nlsr.experiment.equal_cost); [] for none.")
    equal_fa_against: str | None = Field(
        None, description="The curve the others are compared with at equal FA cost: a sweep's label, e.g. "
                          "'exact-q' (default: the first curve).")

    def all_sweeps(self) -> list[SweepSection]:
        """``sweep`` (if any), then ``sweeps``."""
        return ([self.sweep] if self.sweep is not None else []) + list(self.sweeps)

    def swept_variants(self) -> list[VariantSection]:
        """The variants the sweeps add (validated like any variant), sweep by sweep in the order of
        their values."""
        out = []
        for sweep in self.all_sweeps():
            base = next(v for v in self.variants if v.name == sweep.variant)
            for value in sweep.values:
                name = sweep_name(base.name, sweep.field, value, sweep.name)
                data = {**base.model_dump(), sweep.field: value, "name": name}
                out.append(VariantSection.model_validate(data))
        return out

    @model_validator(mode="after")
    def _sweep_names_a_variant(self) -> RealignSection:
        names = [v.name for v in self.variants]
        for sweep in self.all_sweeps():
            if sweep.variant not in names:
                raise ValueError(f"sweep.variant '{sweep.variant}' is not a variant; use one of {names}")
        labels = [sweep.label() for sweep in self.all_sweeps()]
        if self.equal_fa_against is not None and self.equal_fa_against not in labels:
            raise ValueError(f"equal_fa_against '{self.equal_fa_against}' is not a curve; use one of {labels}")
        if not self.all_sweeps():
            return self
        try:
            swept = [v.name for v in self.swept_variants()]
        except ValidationError as err:
            raise ValueError(f"sweep: {err.errors()[0]['msg']}") from None
        clashes = sorted(set(swept) & set(names))
        if clashes:
            raise ValueError(f"sweep variant names {clashes} clash with listed variants; rename those")
        repeated = sorted({n for n in swept if swept.count(n) > 1})
        if repeated:
            raise ValueError(f"two sweeps make the variant names {repeated}; give them distinct 'name' templates")
        return self

    @field_validator("equal_fa_costs")
    @classmethod
    def _positive_costs(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError(f"equal_fa_costs must be FA points above 0 (a cost), got {value}")
        return value

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, value: list[VariantSection]) -> list[VariantSection]:
        names = [v.name for v in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {duplicates}")
        return value


class JudgeSpec(_Section):
    """One judge of the report: a registered judge name and, for judges that run a model, which
    model and where. In a config a plain name (``refusal``) means ``{name: refusal}``."""

    name: str = Field(description="A registered judge: refusal, trained, beaverdam or llamaguard.")
    model: str | None = Field(
        None, description="trained: a judge folder from `nlsr judge train` (default: the cached default "
                          "judge); beaverdam / llamaguard (required): a model folder or hub id.")
    device: str | None = Field(None, description="beaverdam / llamaguard: cpu, cuda, cuda:1 ... (default: "
                                                 "the run's device).")
    dtype: Literal["auto", "float32", "bfloat16"] | None = Field(
        None, description="beaverdam / llamaguard: the model's precision (default: auto).")
    label: str = Field("", description="Column name in the report (default: the name); set it when two "
                                       "judges share a name.")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and not value.get("label") and isinstance(value.get("name"), str):
            value = {**value, "label": value["name"]}
        return value

    @field_validator("label")
    @classmethod
    def _label_is_folder(cls, value: str) -> str:
        return folder_name(value, "judge label")

    @model_validator(mode="after")
    def _known_and_complete(self) -> JudgeSpec:
        needs_model = _known(JUDGES, self.name).meta.get("needs_model", False)
        if needs_model and self.model is None:
            raise ValueError(f"judge '{self.name}' needs a model: write {{name: {self.name}, model: "
                             "FOLDER_OR_HUB_ID}")
        if not needs_model and (self.device is not None or self.dtype is not None):
            model_judges = [n for n in JUDGES if JUDGES.info(n).meta.get("needs_model")]
            raise ValueError(f"judge '{self.name}' runs no model on a device; drop device and dtype "
                             f"(they apply to {' and '.join(model_judges)})")
        if self.name == "refusal" and self.model is not None:
            raise ValueError("judge 'refusal' takes no model; drop model")
        return self


class EvaluateSection(_Section):
    harmful_dataset: str = "harmful_eval"
    harmful_n: int = Field(502, gt=0)
    harmful_max_new_tokens: int = Field(64, gt=0)
    validation_fraction: float = Field(
        0.3, ge=0, lt=1, description="Share of the harmful prompts set aside (by a fixed hash of the prompt "
                                     "text, whatever the seed) for choosing knobs; tables report the rest (test).")
    extra_harmful: list[str] = Field(
        default_factory=list, description="Other harmful-prompt sets (registry names) scored as extra, "
                                          "out-of-distribution HS columns (test only).")
    extra_harmful_n: int = Field(100, gt=0, description="Prompts per extra harmful set (a fixed sample).")
    gold_labels: str | None = Field(
        None, description="Hand-labelled generations (results/judge-gold/labels.jsonl): the report prints "
                          "every judge's agreement with them and picks the default judge by Cohen's kappa.")
    task_n: int = Field(872, gt=0, description="Task evaluation rows (first n).")
    xstest_n: int = Field(250, ge=0, description="XSTest safe prompts for over-refusal (0 = skip).")
    xstest_max_new_tokens: int = Field(48, gt=0)
    xstest_validation_n: int = Field(
        0, ge=0, description="Further XSTest safe prompts (stratified by type, disjoint from the xstest_n "
                             "test prompts) on which knobs such as the alignment recipe are chosen (0 = none).")
    judges: list[JudgeSpec] = Field(
        default_factory=lambda: [JudgeSpec(name="refusal"), JudgeSpec(name="trained")],
        description="Judges of the harmful score: names, or {name, model, device, dtype} mappings.")
    batch_size: int = Field(32, gt=0)
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Generation backend: 'vllm' on a GPU where vLLM is installed, else 'hf'; "
                            "'auto' picks vLLM when it can run.")
    evaluate_aligned: bool = Field(True, description="Also evaluate the aligned model before the attack.")

    @field_validator("judges")
    @classmethod
    def _unique_judge_labels(cls, value: list[JudgeSpec]) -> list[JudgeSpec]:
        labels = [j.label for j in value]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"judges {repeated} appear twice; drop the copy, or give each a distinct "
                             "label ({name: trained, model: FOLDER, label: trained-new})")
        return value


DEFENCE_ALIGNED_PREFIX = "aligned-"
"""The model name of a defence's own aligned model, before the attack: ``aligned-<defence>``."""


class DefenceSection(_Section):
    """A baseline defence run through the same attack and evaluation (the paper's comparison)."""

    name: str
    method: str = Field(description="A registered defence (nlsr.training.defences.DEFENCES): "
                                    + ", ".join(DEFENCES.names()) + ".")
    rho: float | None = Field(None, ge=0, description="Vaccine: perturbation norm (default 2); "
                                                     "Lisa: proximal strength (default 1).")
    fraction: float = Field(0.1, ge=0, lt=1, description="Mixing: share of safety rows in the fine-tuning set.")
    vaccine_stages: list[Literal["sft", "dpo"]] = Field(
        default_factory=lambda: ["sft", "dpo"], min_length=1,
        description="Vaccine: the alignment stages trained perturbation-aware (the paper applies Vaccine "
                    "where the alignment is learned: here the SFT, merged into W_0, and the DPO adapter).")
    k_align: int = Field(4, gt=0, description="Lisa: optimizer steps on safety data per cycle.")
    k_finetune: int = Field(36, gt=0, description="Lisa: optimizer steps on task data per cycle.")
    beta_schedule: list[float] = Field(default_factory=lambda: [0.5, 2.0, 2.0, 2.0, 2.0, 0.1],
                                       description="ConstrainedSFT: β per response position, last repeats.")

    @field_validator("name")
    @classmethod
    def _name_is_folder(cls, value: str) -> str:
        return folder_name(value, "defence name")

    @field_validator("method")
    @classmethod
    def _known_defence(cls, value: str) -> str:
        return _known(DEFENCES, value).name


class ExperimentConfig(_Section):
    """The whole experiment, one section per stage."""

    name: str = "experiment"
    seed: int = Field(0, description="Seed of the data draws and of the alignment stages.")
    seeds: list[int] = Field(
        default_factory=list, description="Run the attack and every stage after it once per seed (the "
                                          "aligned model is shared); tables give means and 95% intervals. "
                                          "Empty = one run with `seed`.")
    model: str = Field("smollm2", description="Base model: 'smollm2', a directory or a hub id.")
    data_dir: str | None = Field(None, description="Offline data folder (default: NLSR_DATA_DIR / shared/data).")
    runs_dir: str = "runs"
    reuse_from: list[str] = Field(default_factory=list, description="Other run folders whose finished stages "
                                  "are copied in when their key matches (e.g. one aligned model, many attacks).")
    template: Literal["alpaca", "chat"] = Field("alpaca", description="Prompt template of every stage.")
    device: str | None = None
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute precision of training, generation and identification: 'auto' = "
                            "bfloat16 where the GPU or CPU computes it natively, else float32.")
    num_processes: int = Field(
        1, ge=1, description="Data-parallel processes per training stage (one per GPU), started with "
                             "`accelerate launch`; batch sizes are summed over them (see nlsr.training.distributed).")
    lora: LoraSection = LoraSection()
    align: AlignSection = AlignSection()
    attack: AttackSection = AttackSection()
    realign: RealignSection = RealignSection()
    evaluate: EvaluateSection = EvaluateSection()
    defences: list[DefenceSection] = Field(default_factory=list, description="Baselines to compare.")
    defence_safety_n: int = Field(200, gt=0, description="Safety rows (disjoint from SFT and calibration) "
                                                          "for Lisa and mixing.")

    @field_validator("name")
    @classmethod
    def _name_is_folder(cls, value: str) -> str:
        return folder_name(value, "run name")

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        from nlsr.paths import check_model_spec

        try:
            check_model_spec(value)
        except NlsrError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("device")
    @classmethod
    def _device_present(cls, value: str | None) -> str | None:
        from nlsr.precision import check_device

        try:
            check_device(value)
        except NlsrError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct (got {value})")
        return value

    @property
    def run_seeds(self) -> list[int]:
        """The seeds of the attack and what follows: ``seeds``, or ``[seed]`` when none are listed."""
        return list(self.seeds) or [self.seed]

    @model_validator(mode="after")
    def _unique_model_names(self) -> ExperimentConfig:
        names = ([v.name for v in self.realign.variants] + [v.name for v in self.realign.swept_variants()]
                 + [d.name for d in self.defences])
        reserved = {"aligned", "attacked", "attacked-p0", "nonaligned"}
        clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & reserved))
        if clashes:
            raise ValueError(f"variant and defence names must be unique and not {sorted(reserved)}; "
                             f"clashing: {clashes}")
        return self

    @model_validator(mode="after")
    def _threat_model(self) -> ExperimentConfig:
        init = self.attack.init
        if init == "continue":
            return self
        entry = [v.name for v in self.realign.variants if v.method == "nlsr" and v.granularity == "entry"]
        if entry:
            raise ValueError(f"attack.init={init}: the NLSR variants {entry} have granularity entry, which "
                             "compares LoRA factors entry by entry and only means something when the "
                             "fine-tune continued the aligned LoRA (attack.init=continue); set "
                             "'granularity: neuron' on them")
        peers = [v.name for v in self.realign.variants if v.method in ("resta", "antidote")]
        if peers:
            raise ValueError(f"attack.init={init}: the RESTA / Antidote variants {peers} edit a fine-tune that "
                             "continued the aligned LoRA (attack.init=continue); drop them")
        if self.defences:
            raise ValueError(f"attack.init={init}: the defences {[d.name for d in self.defences]} train on "
                             "the aligned LoRA (attack.init=continue); drop them or run them with "
                             "attack.init=continue")
        if init == "full" and self.num_processes > 1:
            raise ValueError("attack.init=full trains in one process; set num_processes: 1")
        ibm = [v.name for v in self.realign.variants if v.method == "safelora" and v.ibm_conventions]
        if init == "full" and ibm:
            raise ValueError(f"attack.init=full: SafeLoRA's full-parameter form has no ibm_conventions; drop "
                             f"it from {ibm}")
        return self


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NlsrError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def merge_sections(base: dict, child: dict) -> dict:
    """``child`` laid over ``base``: mappings merge key by key (recursively); any other value, lists
    included, replaces the base's; ``null`` clears it."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise NlsrError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise NlsrError(f"config file '{path}' is not valid YAML: {' '.join(str(err).split())}") from err
    except UnicodeDecodeError as err:
        raise NlsrError(f"config file '{path}' is not UTF-8 text ({err.reason}); give a YAML config "
                        "such as configs/smoke.yaml") from err
    if not isinstance(data, dict):
        raise NlsrError(f"config file '{path}' must hold a mapping of sections")
    return data


def read_config_data(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping with its ``base:`` chain resolved.

    ``base: other.yaml`` (a path relative to this file's folder) takes that config as the starting
    point; this file's own sections are laid over it (:func:`merge_sections`). Side experiments that
    share one run's aligned model name it as their base, so the alignment is written once."""
    path = Path(path)
    data = _read_yaml_mapping(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise NlsrError(f"config file '{path}': 'base' must be the path of another config file, "
                        f"relative to '{path.parent}' (got {base!r})")
    base_path = path.parent / base
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p.name) for p in (*chain, base_path))
        raise NlsrError(f"config file '{path}': its 'base' chain loops ({names}); remove one 'base'")
    if not base_path.is_file():
        raise NlsrError(f"config file '{path}': its base '{base}' does not exist (looked for '{base_path}'); "
                        "fix the path, which is relative to the config's own folder")
    return merge_sections(read_config_data(base_path, chain), data)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (resolving its ``base:`` chain), apply ``a.b=c`` overrides (values parsed as
    YAML), and validate it.

    Raises:
        NlsrError: missing file, bad YAML, a missing or looping base, or every validation problem at
            once, each naming its field.
    """
    path = Path(path)
    data = read_config_data(path)
    if not data:
        raise NlsrError(f"config file '{path}' sets nothing; an experiment config names at least its model and "
                        "sizes: start from configs/smoke.yaml (minutes) or configs/cpu-bench.yaml")
    for item in overrides or []:
        if "=" not in item:
            raise NlsrError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise NlsrError(f"override '{item}': the value is not valid YAML ({' '.join(str(err).split())})") from err
        _set_dotted(data, key.strip(), value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                             for e in err.errors())
        raise NlsrError(f"invalid config '{path}': {problems}") from None
