"""The threat models beyond the paper (``attack.init``): a fresh LoRA on the merged aligned model, or a
full fine-tune of it, and their repair at neuron granularity.

* ``align_merged`` (:func:`run_merge_aligned`): the released aligned model ``W_a = W_0 + ΔW_a`` as a
  model directory, written once and shared by every seed (``nlsr_merged.json`` records which adapter
  was merged into which base).
* the attack (:func:`run_attack_init`): a fresh LoRA of rank ``attack.fresh_r`` on ``W_a``, or a full
  fine-tune of ``W_a`` saved as a model directory.
* ``identify-...-neuron`` (:func:`run_identify_neuron`): the ExPO reference and its row masks, as an
  adapter on ``W_0`` (continue, fresh) or as the dense model ``W_e = W_a + β (W_a - W_0)`` (full).
* ``realign-<variant>`` (:func:`run_realign`): NLSR at neuron granularity, and SafeLoRA on a model
  directory (the full-parameter form) for full fine-tunes.
"""

from __future__ import annotations

import json
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.experiment.config import ExperimentConfig, LoraSection, VariantSection
from nlsr.experiment.stages.common import read_jsonl

MERGED = "align_merged"
"""The name of the stage that writes the merged aligned model (its ``model/`` folder)."""


def fresh_lora(cfg: ExperimentConfig) -> LoraSection:
    """The fresh LoRA of ``attack.init=fresh``: ``lora`` with ``attack.fresh_r`` / ``fresh_alpha``."""
    return cfg.lora.model_copy(update={"r": cfg.attack.fresh_r or cfg.lora.r,
                                       "alpha": cfg.attack.fresh_alpha or cfg.lora.alpha})


def neuron_identify_name(variant: VariantSection) -> str:
    """The identification stage of a neuron-granularity variant (shared by variants and seeds)."""
    from nlsr.experiment.stages.realign import identify_id

    return f"identify-{identify_id(variant)}-neuron"


def _final(out: Path) -> Path:
    """Where a stage's files will be once it is finished (``out`` is its ``.partial`` folder)."""
    return out.with_name(out.name.removesuffix(".partial"))


def run_merge_aligned(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """``W_a = W_0 + s B_a A_a`` written to ``model/`` (the aligned model a service would release)."""
    from nlsr.weights.adapters import load_adapter
    from nlsr.weights.model_dirs import ModelDir, merge_adapter

    # absolute paths: nlsr_merged.json names them, and neuron realign may read them from elsewhere
    aligned = load_adapter((inputs["align_dpo"] / "adapter").resolve())
    weak = ModelDir((inputs["align_sft"] / "model").resolve(), "align_sft")
    merge_adapter(weak, aligned, out / "model", force=True)
    return {"line": f"merged the aligned adapter ({len(aligned)} modules) into W_0"}


def run_attack_init(init: str, benign: bool = False):
    """A stage function fine-tuning the merged aligned model on the poisoned task data: a fresh LoRA
    (``init='fresh'``, written to ``adapter/``) or every weight (``init='full'``, ``model/``).

    ``benign``: the same task rows without the harmful ones (the p = 0 control)."""
    if init not in ("fresh", "full"):
        raise ValueError(f"run_attack_init takes init 'fresh' or 'full' (got {init!r})")

    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from nlsr.experiment.stages.attack import _render, attack_rows
        from nlsr.training.trainers import lora_config, set_seed, train_sft, training_line
        from nlsr.weights.models import load_model

        cfg = ctx.config
        set_seed(ctx.seed)
        rows = _render(ctx, attack_rows(ctx, inputs, benign))
        merged = inputs[MERGED] / "model"
        if init == "fresh":
            lora = fresh_lora(cfg)
            if cfg.num_processes > 1:
                from nlsr.training.distributed import train_stage_job

                stats = train_stage_job(ctx, "sft", merged, rows, cfg.attack, out / "adapter", lora=lora)
            else:
                model = load_model(str(merged), device=cfg.device, precision="float32")
                stats = train_sft(model, ctx.tokenizer(), rows, cfg.attack, out / "adapter", ctx.seed,
                                  lora=lora_config(lora), bf16=ctx.precision.bf16)
            what = f"fresh LoRA r={lora.r}"
        else:
            section = cfg.attack.model_copy(update={"lr": cfg.attack.full_lr or cfg.attack.lr})
            model = load_model(str(merged), device=cfg.device, precision="float32")
            stats = train_sft(model, ctx.tokenizer(), rows, section, out / "model", ctx.seed, lora=None,
                              bf16=ctx.precision.bf16)
            ctx.tokenizer().save_pretrained(out / "model")
            what = f"full fine-tune, lr {section.lr:g}"
        return {**stats, "line": f"{what}: {training_line(len(rows), 'rows', stats)}"}
    return run


def _calibration(inputs: dict[str, Path]) -> tuple[list, dict]:
    from nlsr.io import file_sha256
    from nlsr.method.calibration import CalibrationRow

    calibration = inputs["data-align"] / "calibration.jsonl"
    rows = [CalibrationRow(r["prompt"], r["response"]) for r in read_jsonl(calibration)]
    return rows, {"calibration": str(calibration), "calibration_sha256": file_sha256(calibration)}


def run_identify_neuron(variant: VariantSection, form: str):
    """A stage function for the ExPO reference of ``variant`` and its neuron (row) masks.

    ``form='adapter'``: the reference ``(1+β) ΔW_a`` as an adapter on ``W_0`` in ``reference/``
    (continue, fresh). ``form='model'``: the dense reference ``W_e = W_a + β (W_a - W_0)`` as a model
    directory in ``reference/`` (full), its update measured from the merged aligned model ``W_a``."""
    if form not in ("adapter", "model"):
        raise ValueError(f"form must be 'adapter' or 'model' (got {form!r})")

    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from nlsr.method.masks import save_masks

        section = ctx.config.realign
        rows, made_from = _calibration(inputs)
        made_from.update(beta=variant.beta, scale_both=variant.scale_both)
        common = dict(rho=variant.rho, q=variant.q, batch_size=section.batch_size,
                      max_length=section.max_length, template=ctx.config.template)
        final = _final(out) / "reference"
        if form == "adapter":
            from nlsr.experiment.stages.common import load_weak
            from nlsr.method.extrapolate import extrapolate
            from nlsr.method.identify import identify
            from nlsr.weights.adapters import load_adapter, save_adapter

            aligned = load_adapter(inputs["align_dpo"] / "adapter")
            reference = extrapolate(aligned, beta=variant.beta, scale_both=variant.scale_both)
            save_adapter(reference, out / "reference", force=True)
            reference.source = str(final)
            model = load_weak(ctx, inputs["align_sft"], precision=ctx.precision.dtype)
            masks = identify(model, reference, rows, ctx.tokenizer(), granularity="neuron",
                             metadata=made_from, **common)
        else:
            from nlsr.method.identify import identify_model_dir
            from nlsr.weights.model_dirs import ModelDir, extrapolate_model
            from nlsr.weights.models import load_model

            # scale_both scales ΔW_a by (1+β)²: the same as β' = (1+β)² - 1 on the dense form
            beta = (1 + variant.beta) ** 2 - 1 if variant.scale_both else variant.beta
            aligned, weak = ModelDir(inputs[MERGED] / "model", MERGED), ModelDir(inputs["align_sft"] / "model")
            record = {"beta": beta, "form": "model", "aligned": str(aligned.path), "weak": str(weak.path)}
            extrapolate_model(aligned, weak, beta, out / "reference", force=True,
                              extra_files={"nlsr_reference.json": (json.dumps(record, indent=2) + "\n").encode()})
            reference = ModelDir(out / "reference", "reference")
            model = load_model(str(out / "reference"), device=ctx.config.device, precision=ctx.precision.dtype)
            masks = identify_model_dir(model, reference, aligned, rows, ctx.tokenizer(),
                                           metadata={**made_from, "reference": str(final)}, **common)
        save_masks(masks, out / "masks.safetensors", force=True)
        forwarded = masks.metadata.get("calibration_tokens")
        return {"metadata": masks.metadata, "tokens": int(forwarded) if forwarded else None,
                "line": f"neuron masks ({form} reference, {len(masks.masks)} modules), "
                        f"{masks.metadata.get('response_tokens', '-')} response tokens"}
    return run


def run_realign(variant: VariantSection, init: str):
    """A stage function repairing the attack of ``init`` with ``variant`` where the entry-wise path of
    :func:`nlsr.experiment.stages.realign.run_variant` does not apply: NLSR at neuron granularity (adapters for
    continue and fresh, model directories for full) and SafeLoRA's full-parameter form (full)."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        if variant.method == "safelora":
            return _safelora_model(ctx, variant, out, inputs)
        from nlsr.method.masks import load_masks

        ident = inputs[neuron_identify_name(variant)]
        masks = load_masks(ident / "masks.safetensors")
        rule = dict(select=variant.select, threshold=variant.threshold, p_base=variant.p_base,
                    epsilon=variant.epsilon, seed=variant.seed)
        if init == "full":
            from nlsr.method.realign import realign_model_dir
            from nlsr.weights.model_dirs import ModelDir

            result = realign_model_dir(ModelDir(ident / "reference", "reference"),
                                           ModelDir(inputs["attack"] / "model", "fine-tuned"),
                                           ModelDir(inputs[MERGED] / "model", MERGED), masks, out / "model",
                                           force=True, **rule)
        else:
            from nlsr.method.realign import realign
            from nlsr.weights.adapters import load_adapter, save_adapter

            # A fresh LoRA sits on W_a = W_0 + ΔW_a: the reference is taken relative to it (β ΔW_a).
            rebase = load_adapter(inputs["align_dpo"] / "adapter") if init == "fresh" else None
            # check_base=False: the stage graph fixes both bases, while adapters copied by reuse_from
            # record the paths of the run folder they were trained in.
            result = realign(load_adapter(ident / "reference"),
                                             load_adapter(inputs["attack"] / "adapter"), masks,
                                             rebase=rebase, check_base=False, **rule)
            report = json.dumps(result.report(), indent=2) + "\n"
            save_adapter(result.adapter, out / "adapter", force=True,
                         extra_files={"realign_report.json": report.encode()})
        return _finish(variant, out, result.report(), result.decisions, "repaired")
    return run


def _finish(variant: VariantSection, out: Path, report: dict, decisions, verb: str) -> dict:
    from nlsr.experiment.plots import plot_similarity_by_layer

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if verb == "repaired":
        plot_similarity_by_layer(decisions, out / "similarity_by_layer.png",
                                 title=f"{variant.name}: safety-region similarity by layer (neuron)")
    summary = report["summary"]
    return {"summary": summary, "line": f"{verb} {summary[verb]} of {summary['modules']} modules"}


def _safelora_model(ctx, variant: VariantSection, out: Path, inputs: dict[str, Path]) -> dict:
    """SafeLoRA's full-parameter form on the full fine-tune: ``ΔW <- C ΔW`` per module, with
    ``V = W_a - W_base`` (``direction: alignment``) or ``W_a - W_0`` (``direction: dpo``)."""
    from nlsr.method.safelora import safelora_models
    from nlsr.weights.model_dir_checks import model_dir_problem
    from nlsr.weights.model_dirs import ModelDir
    from nlsr.weights.models import resolve_model_path

    if variant.direction == "dpo":
        unaligned = ModelDir(inputs["align_sft"] / "model", "align_sft")
    else:
        base = Path(resolve_model_path(ctx.config.model))
        problem = model_dir_problem(base)
        if problem:
            raise NlsrError(f"SafeLoRA variant '{variant.name}' with direction: alignment needs the base "
                            f"model as a local safetensors directory ({problem}); give `model` as a local "
                            "directory or set direction: dpo")
        unaligned = ModelDir(base, "model")
    result = safelora_models(ModelDir(inputs[MERGED] / "model", MERGED), unaligned,
                             ModelDir(inputs["attack"] / "model", "fine-tuned"), out / "model",
                             threshold=variant.threshold, num_modules=variant.num_modules, force=True)
    return _finish(variant, out, result.report(), result.decisions, "projected")
