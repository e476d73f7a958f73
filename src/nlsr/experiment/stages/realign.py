"""Stages 4-5: reference + safety masks (per β, ρ, q), then each realignment variant."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.experiment.config import VariantSection
from nlsr.experiment.stages.common import load_weak, read_jsonl, write_jsonl
from nlsr.io import file_sha256
from nlsr.method.calibration import CalibrationRow
from nlsr.method.extrapolate import extrapolate
from nlsr.method.identify import identify
from nlsr.method.masks import SafetyMasks, load_masks, provenance, save_masks
from nlsr.weights.adapters import load_adapter, save_adapter, weight_key


def random_masks(adapter, q: float, seed: int, **metadata) -> SafetyMasks:
    """Masks of the same density as identified ones, at random positions (a control).

    Their metadata records the adapter's fingerprint like identified masks (see
    :func:`nlsr.method.identify.provenance`); ``metadata`` adds fields such as ``beta``."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, f in adapter:
        for factor, tensor in (("A", f.A), ("B", f.B)):
            count = max(1, round(q * tensor.numel()))
            flat = torch.zeros(tensor.numel(), dtype=torch.bool)
            flat[torch.randperm(tensor.numel(), generator=gen)[:count]] = True
            masks[weight_key(name, factor)] = flat.view_as(tensor)
    return SafetyMasks(masks, provenance(adapter, random="true", keep_fraction=q, seed=seed, **metadata))


def run_identify(variant: VariantSection):
    """A stage function for the reference and masks that ``variant`` needs."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        aligned = load_adapter(inputs["align_dpo"] / "adapter")
        reference = extrapolate(aligned, beta=variant.beta, scale_both=variant.scale_both)
        save_adapter(reference, out / "reference", force=True)      # a resumed stage rewrites its own files
        # where the reference will be once the stage is finished (``out`` is the .partial folder)
        reference.source = str(out.with_name(out.name.removesuffix(".partial")) / "reference")
        made_from = {"beta": variant.beta, "scale_both": variant.scale_both}
        if variant.masks == "random":
            masks = random_masks(reference, variant.q, seed=ctx.config.seed, **made_from)
        elif variant.masks == "magnitude":
            from nlsr.method.controls import magnitude_masks

            masks = magnitude_masks(reference, variant.q, **made_from)
        else:
            calibration = inputs["data-align"] / "calibration.jsonl"
            rows = [CalibrationRow(r["prompt"], r["response"]) for r in read_jsonl(calibration)]
            made_from.update(calibration=str(calibration), calibration_sha256=file_sha256(calibration))
            section = ctx.config.realign
            model = load_weak(ctx, inputs["align_sft"], precision=ctx.precision.dtype)
            masks = identify(model, reference, rows, ctx.tokenizer(),
                             rho=variant.rho, q=variant.q, batch_size=section.batch_size,
                             max_length=section.max_length, template=ctx.config.template,
                             metadata=made_from)
        save_masks(masks, out / "masks.safetensors", force=True)
        tokens = masks.metadata.get("response_tokens", "-")
        forwarded = masks.metadata.get("calibration_tokens")
        return {"metadata": masks.metadata, "tokens": int(forwarded) if forwarded else None,
                "line": f"masks ({variant.masks}), {tokens} response tokens"}
    return run


def run_identify_task(variant: VariantSection):
    """A stage function for ``protect_task`` on this seed's fine-tuned adapter and clean task rows:
    the task-critical masks by the paper's identification (same ρ; ``magnitude``), or the diagonal
    Fisher information of the factor entries (``fisher``; the masks depend on the reference too and
    are drawn in the realign stage)."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from nlsr.experiment.stages.data import task_calibration_rows

        attack_rows = read_jsonl(inputs["data-attack"] / "attack.jsonl")
        rows = task_calibration_rows(ctx.config, ctx.data_dir, attack_rows, variant.task_calibration_n, ctx.seed)
        write_jsonl(out / "task_calibration.jsonl", rows)
        calibration = [CalibrationRow(r["instruction"], r["output"], r.get("input", "")) for r in rows]
        finetuned = load_adapter(inputs["attack"] / "adapter")
        section, task = ctx.config.realign, ctx.config.attack.task
        if variant.protect_task_score == "fisher":
            from safetensors.torch import save_file

            from nlsr.method.protect_task import fisher_diagonal

            model = load_weak(ctx, inputs["align_sft"], precision="float32")     # gradients in float32
            fisher = fisher_diagonal(model, finetuned, calibration, ctx.tokenizer(), max_length=section.max_length,
                                     template=ctx.config.template, batch_size=section.batch_size)
            save_file({k: v.contiguous() for k, v in fisher.items()}, out / "task_fisher.safetensors")
            return {"line": f"diagonal Fisher of the fine-tuned adapter on {len(rows)} {task} rows"}
        model = load_weak(ctx, inputs["align_sft"], precision=ctx.precision.dtype)
        masks = identify(model, finetuned, calibration,
                         ctx.tokenizer(), rho=variant.rho, q=variant.protect_task, batch_size=section.batch_size,
                         max_length=section.max_length, template=ctx.config.template,
                         metadata={"task": task, "calibration": "task_calibration.jsonl"})
        save_masks(masks, out / "task_masks.safetensors", force=True)
        tokens = masks.metadata.get("response_tokens", "-")
        return {"metadata": masks.metadata, "line": f"task masks of the fine-tuned adapter, {len(rows)} "
                                                    f"{task} rows, {tokens} response tokens"}
    return run


def task_masks(variant: VariantSection, folder: Path, reference, finetuned) -> SafetyMasks:
    """The task-critical masks of ``protect_task`` from its ``identify-task`` stage folder."""
    if variant.protect_task_score == "fisher":
        from nlsr.method.protect_task import costliest_entries, transplant_cost
        from nlsr.weights.adapters import read_safetensors

        fisher = read_safetensors(folder / "task_fisher.safetensors", "Fisher file", "run the stage again")
        return costliest_entries(transplant_cost(fisher, reference, finetuned), variant.protect_task, finetuned)
    return load_masks(folder / "task_masks.safetensors")


def without_task_entries(safety: SafetyMasks, task: SafetyMasks) -> tuple[SafetyMasks, float]:
    """``safety`` with the task-critical entries removed (``M ∧ ¬M_task``), and the share of the
    safety entries removed. The metadata stays the safety masks' (they still belong to the reference)."""
    kept, before, after = {}, 0, 0
    for key, mask in safety.masks.items():
        if key not in task.masks or task.masks[key].shape != mask.shape:
            raise NlsrError(f"the task masks lack '{key}' or differ in shape; identify them again")
        kept[key] = mask & ~task.masks[key]
        before += int(mask.sum())
        after += int(kept[key].sum())
    metadata = {**safety.metadata, "protect_task": "true"}
    return SafetyMasks(kept, metadata, source=safety.source), (1 - after / before) if before else 0.0


def antidote_stage_name(variant: VariantSection) -> str:
    """Antidote's activation norms of one seed's fine-tune on ``antidote_n`` harmful rows (shared by
    the sparsities)."""
    return f"antidote-scores-n{variant.antidote_n}"


def run_antidote_scores(variant: VariantSection):
    """A stage function: this seed's harmful (prompt, answer) rows for Antidote (poison-pool rows the
    attack did not use, gated like the rest) and the activation norms of the fine-tuned model on them."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from safetensors.torch import save_file

        from nlsr.experiment.stages.data import antidote_harmful_rows
        from nlsr.method.antidote import harmful_activation_norms

        attack_rows = read_jsonl(inputs["data-attack"] / "attack.jsonl")
        align = inputs["data-align"]
        rows = antidote_harmful_rows(ctx.config, ctx.data_dir, attack_rows, read_jsonl(align / "sft.jsonl"),
                                     read_jsonl(align / "calibration.jsonl"), variant.antidote_n, ctx.seed)
        write_jsonl(out / "harmful_rows.jsonl", rows)
        finetuned = load_adapter(inputs["attack"] / "adapter")
        section = ctx.config.realign
        model = load_weak(ctx, inputs["align_sft"], precision=ctx.precision.dtype)
        norms = harmful_activation_norms(model, finetuned, [CalibrationRow(r["prompt"], r["response"]) for r in rows],
                                         ctx.tokenizer(), batch_size=section.batch_size,
                                         max_length=section.max_length, template=ctx.config.template)
        tensors = {f"{name}.{part}": t.contiguous() for name, pair in norms.items()
                   for part, t in zip("xz", pair, strict=True)}
        save_file(tensors, out / "norms.safetensors")
        return {"line": f"activation norms of the fine-tune on {len(rows)} harmful rows"}
    return run


def load_antidote_norms(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The norms :func:`run_antidote_scores` wrote, by module."""
    from nlsr.weights.adapters import read_safetensors

    flat = read_safetensors(folder / "norms.safetensors", "Antidote norms", "run the stage again")
    names = {k.rsplit(".", 1)[0] for k in flat}
    return {n: (flat[f"{n}.x"], flat[f"{n}.z"]) for n in names}


def run_variant(variant: VariantSection):
    """A stage function that repairs the attacked adapter with ``variant``."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from nlsr.experiment.plots import plot_similarity_by_layer

        attacked = load_adapter(inputs["attack"] / "adapter")
        if variant.method == "resta":
            from nlsr.method.resta import resta

            result = resta(load_adapter(inputs["align_dpo"] / "adapter"), attacked, gamma=variant.gamma)
            report = result.report()
            line = (f"added {variant.gamma:g} x the aligned update "
                    f"({100 * result.relative_change:.1f}% of the fine-tune's)")
        elif variant.method == "antidote":
            from nlsr.method.antidote import antidote

            result = antidote(attacked, load_antidote_norms(inputs["antidote-scores"]), sparsity=variant.sparsity)
            report = result.report()
            line = (f"pruned {result.summary['pruned_entries']} factor entries "
                    f"({100 * result.relative_change:.1f}% update change)")
        elif variant.method == "safelora":
            from nlsr.method.safelora import safelora

            aligned = load_adapter(inputs["align_dpo"] / "adapter")
            directions = (alignment_directions(ctx, inputs["align_sft"], aligned)
                          if variant.direction == "alignment" else None)
            result = safelora(aligned, attacked, threshold=variant.threshold, num_modules=variant.num_modules,
                              dense_directions=directions, ibm_conventions=variant.ibm_conventions)
            report = result.report()
            line = f"projected {report['summary']['projected']} of {report['summary']['modules']} modules"
        else:
            from nlsr.method.realign import realign, self_transplant_change

            ident = inputs[f"identify-{identify_id(variant)}"]
            reference = load_adapter(ident / "reference")
            masks, protected = load_masks(ident / "masks.safetensors"), None
            if variant.protect_task is not None:
                task = task_masks(variant, inputs["identify-task"], reference, attacked)
                masks, protected = without_task_entries(masks, task)
            result = realign(reference, attacked, masks,
                             select=variant.select, transplant=variant.transplant, threshold=variant.threshold,
                             p_base=variant.p_base, epsilon=variant.epsilon, seed=variant.seed,
                             fill=attacked if variant.reference == "self" else None)
            report = result.report()
            # what the form alone erases: this fine-tune against itself with these masks, every module
            report["summary"]["self_transplant_change"] = self_transplant_change(attacked, masks, variant.transplant)
            line = f"repaired {report['summary']['repaired']} of {report['summary']['modules']} modules"
            if protected is not None:
                report["summary"]["task_protected_share"] = protected
                line += f"; {100 * protected:.1f}% of the safety entries left out as task-critical"
            plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png",
                                     title=f"{variant.name}: safety-region similarity by layer")
        save_adapter(result.adapter, out / "adapter", force=True)
        report["summary"]["method"] = variant.method
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return {"summary": report["summary"], "line": line}
    return run


def alignment_directions(ctx, align_sft: Path, aligned) -> dict[str, torch.Tensor]:
    """SafeLoRA's ``V`` for the whole alignment, per adapted module: ``(W_0 - W_base) + ΔW_dpo``,
    dense (float32), where ``W_0`` is the base with the safety SFT merged in."""
    from nlsr.experiment.stages.common import load_base
    from nlsr.weights.model_dirs import ModelDir

    key = ("alignment_directions", str(align_sft), str(aligned.source))
    if key not in ctx.cache:          # the same for every seed of a run: load the base model once
        base = load_base(ctx).state_dict()
        weak = ModelDir(align_sft / "model")
        ctx.cache[key] = {name: (weak.tensor(f"{name}.weight").float() - base[f"{name}.weight"].float()
                                 + f.scale * (f.B.float() @ f.A.float())) for name, f in aligned}
    return ctx.cache[key]


def task_identify_name(variant: VariantSection) -> str:
    """The stage of ``protect_task``'s task masks (one per ρ, fraction and row count, per seed) or
    Fisher information (one per row count, per seed)."""
    if variant.protect_task_score == "fisher":
        return f"identify-task-fisher-n{variant.task_calibration_n}"
    return f"identify-task-r{variant.rho:g}-q{variant.protect_task:g}-n{variant.task_calibration_n}"


def identify_id(variant: VariantSection) -> str:
    """Variants that share β, scaling, ρ, q and mask kind share one identification stage."""
    both = "-both" if variant.scale_both else ""
    return f"b{variant.beta:g}{both}-r{variant.rho:g}-q{variant.q:g}-{variant.masks}"
