"""The command-line side of neuron granularity and model directories (called from :mod:`nlsr.cli`).

``nlsr identify/realign --granularity neuron``, and ``nlsr extrapolate`` / ``nlsr safelora`` on
model directories. Like the other commands, each function checks its arguments and paths first and
imports torch only after that.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from nlsr.cli.common import ADAPTER_CONFIG, require_adapter_dir, require_file
from nlsr.errors import NlsrError
from nlsr.io import check_output_path
from nlsr.weights.model_dir_checks import model_dir_problem

GRANULARITY_NAMES: tuple[str, ...] = ("entry", "neuron")


def _say(message: str) -> None:
    typer.echo(message)


def path_kind(path: Path, option: str) -> str:
    """``model`` for a safetensors model directory (config.json, no adapter_config.json), else
    ``adapter`` after the adapter directory checks (whose messages name what is missing)."""
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() and (path / "config.json").is_file():
        problem = model_dir_problem(path)
        if problem:
            raise NlsrError(f"{option}: {problem}")
        return "model"
    require_adapter_dir(path, option)
    return "adapter"


def refuse_model_dir(path: Path, option: str, command: str) -> None:
    """At entry granularity only adapters apply: name the mode that takes model directories."""
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() and (path / "config.json").is_file():
        raise NlsrError(f"{option}: '{path}' is a model directory, but {command} at entry granularity "
                        "compares LoRA factors entry by entry; for model directories (full fine-tunes) "
                        "use --granularity neuron with --base DIR")


def identify_neuron(*, base: str, reference: Path, calibration: Path, out: Path, rank_ratio: float,
                    keep: float, limit: int | None, prompt_field: str, response_field: str,
                    batch_size: int, max_length: int, template: str | None, device: str | None,
                    precision: str | None, force: bool, allow_pickle: bool,
                    allow_base_mismatch: bool, made_from: dict) -> None:
    """``nlsr identify --granularity neuron``: row masks of an adapter or model-directory reference."""
    from nlsr.paths import check_model_spec

    kind = path_kind(reference, "--reference")
    if kind == "model":
        problem = model_dir_problem(Path(base))
        if problem:
            raise NlsrError(f"--base: {problem}; with a model-directory reference, --base is the model "
                            "directory its update is measured from")
    else:
        check_model_spec(base)
    require_file(calibration, "calibration file", 'give a JSONL file of {"prompt", "response"} rows')
    check_output_path(out, force)
    from nlsr.cli.common import check_device, model_errors
    from nlsr.method.calibration import read_calibration_jsonl
    from nlsr.method.masks import save_masks
    from nlsr.precision import resolve_precision
    from nlsr.weights.models import load_model, load_tokenizer

    check_device(device)
    rows = read_calibration_jsonl(calibration, limit=limit, prompt_field=prompt_field,
                                  response_field=response_field)
    chosen = resolve_precision(precision, device)
    common = dict(rho=rank_ratio, q=keep, batch_size=batch_size, max_length=max_length,
                  template=template)
    if kind == "adapter":
        from nlsr.method.identify import identify
        from nlsr.weights.adapters import load_adapter, same_base

        ref = load_adapter(reference, allow_pickle)
        if ref.base_model and not allow_base_mismatch and not same_base(ref.base_model, base):
            raise NlsrError(f"the reference adapter '{reference}' was trained on base model "
                            f"'{ref.base_model}' but --base is '{base}'; identify on the model the "
                            "adapter belongs to, or pass --allow-base-mismatch if they are the same "
                            "model under two names")
        with model_errors(base):
            tokenizer = load_tokenizer(base)
        _say(chosen.line())
        with model_errors(base):
            model = load_model(base, device=device, precision=chosen.dtype)
        masks = identify(model, ref, rows, tokenizer, granularity="neuron", metadata=made_from, **common)
        modules = len(ref)
    else:
        from nlsr.method.identify import identify_model_dir
        from nlsr.weights.model_dirs import ModelDir

        ref_dir, base_dir = ModelDir(reference, "--reference"), ModelDir(base, "--base")
        with model_errors(str(reference)):
            tokenizer = load_tokenizer(str(reference))
        _say(chosen.line())
        with model_errors(str(reference)):
            model = load_model(str(reference), device=device, precision=chosen.dtype)
        made_from = {k: v for k, v in made_from.items() if k not in ("reference", "base")}
        masks = identify_model_dir(model, ref_dir, base_dir, rows, tokenizer, metadata=made_from,
                                       check_base=not allow_base_mismatch, **common)
        modules = len(masks.masks)
    save_masks(masks, out, force=force)
    _say(f"neuron masks for {modules} modules from {len(rows)} rows "
         f"({masks.metadata['response_tokens']} response tokens, {masks.metadata['input_covariances']} "
         f"input covariances, {masks.metadata['template']} template), density {masks.density():.3f} -> {out}")


def realign_neuron(*, reference: Path, finetuned: Path, masks: Path, out: Path, base: Path | None,
                   rebase: Path | None, select: str, threshold: float | None, p_base: float,
                   epsilon: float, seed: int, allow_base_mismatch: bool, allow_mask_mismatch: bool,
                   force: bool, allow_pickle: bool) -> None:
    """``nlsr realign --granularity neuron``: adapters of any rank, or model directories."""
    ref_kind = path_kind(reference, "--reference")
    ft_kind = path_kind(finetuned, "--finetuned")
    if ref_kind != ft_kind:
        raise NlsrError(f"--reference is {'an adapter' if ref_kind == 'adapter' else 'a model directory'} "
                        f"but --finetuned is {'an adapter' if ft_kind == 'adapter' else 'a model directory'}; "
                        "give both as adapters or both as model directories (for a full fine-tune, make "
                        "the reference a model directory with `nlsr extrapolate --aligned DIR --weak DIR`)")
    if ref_kind == "adapter":
        if base is not None:
            raise NlsrError("--base is for model directories; adapters record their base in "
                            "adapter_config.json (use --rebase ADAPTER when the fine-tune's base has an "
                            "adapter merged in)")
        if rebase is not None:
            require_adapter_dir(rebase, "--rebase")
    else:
        if rebase is not None:
            raise NlsrError("--rebase is for adapters; for model directories give --base, the model "
                            "both updates are measured from")
        if base is None:
            raise NlsrError("model directories need --base DIR, the model both updates are measured "
                            "from (for a fine-tune of the merged aligned model: that merged model)")
        problem = model_dir_problem(base)
        if problem:
            raise NlsrError(f"--base: {problem}")
    require_file(masks, "mask file", "make one with `nlsr identify --granularity neuron`")
    check_output_path(out, force)
    from nlsr.experiment.plots import plot_similarity_by_layer
    from nlsr.method.masks import load_masks

    loaded = load_masks(masks)
    rule = dict(select=select, threshold=threshold, p_base=p_base, epsilon=epsilon, seed=seed,
                check_base=not allow_base_mismatch, allow_mask_mismatch=allow_mask_mismatch)
    if ref_kind == "adapter":
        from nlsr.method.realign import realign
        from nlsr.weights.adapters import load_adapter, save_adapter

        result = realign(
            load_adapter(reference, allow_pickle), load_adapter(finetuned, allow_pickle, dtype=None), loaded,
            rebase=load_adapter(rebase, allow_pickle) if rebase is not None else None, granularity="neuron",
            **rule)
        report = result.report()
        report["settings"].update({"reference": str(reference), "finetuned": str(finetuned),
                                   "masks": str(masks)})
        save_adapter(result.adapter, out, force=force, extra_files={
            "realign_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    else:
        from nlsr.method.realign import realign_model_dir
        from nlsr.weights.model_dirs import ModelDir

        result = realign_model_dir(ModelDir(reference, "--reference"), ModelDir(finetuned, "--finetuned"),
                                       ModelDir(base, "--base"), loaded, out, force=force, **rule)
        report = result.report()
    plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png")
    for note in result.notes:
        _say(note)
    summary = report["summary"]
    _say(f"repaired {summary['repaired']} of {summary['modules']} modules ({select}, neuron granularity, "
         f"{summary['rows_replaced']} rows from the reference) -> {out}")


def extrapolate_model(*, aligned: Path, weak: Path | None, beta: float, out: Path, force: bool) -> None:
    """``nlsr extrapolate`` on model directories: ``W_e = W_a + β (W_a - W_0)``."""
    if weak is None:
        raise NlsrError("--aligned is a model directory: give --weak DIR, the model it was aligned "
                        "from (W_0), for W_e = W_a + β (W_a - W_0)")
    problem = model_dir_problem(weak)
    if problem:
        raise NlsrError(f"--weak: {problem}")
    check_output_path(out, force)
    from nlsr.weights.model_dirs import ModelDir
    from nlsr.weights.model_dirs import extrapolate_model as run

    made = {"beta": beta, "aligned": str(aligned), "weak": str(weak), "form": "model"}
    changed = run(ModelDir(aligned, "--aligned"), ModelDir(weak, "--weak"), beta, out, force=force,
                  extra_files={"nlsr_reference.json": (json.dumps(made, indent=2) + "\n").encode()})
    _say(f"reference model W_a + {beta} (W_a - W_0): {len(changed)} tensors extrapolated, the rest "
         f"copied -> {out}")


def safelora_model(*, aligned: Path, finetuned: Path, unaligned: Path | None, threshold: float | None,
                   num_modules: int | None, out: Path, force: bool) -> None:
    """``nlsr safelora`` on model directories (full-parameter form)."""
    for path, option in ((finetuned, "--finetuned"), (unaligned, "--unaligned")):
        if path is None:
            raise NlsrError("--aligned is a model directory: give --unaligned DIR, the model it was "
                            "aligned from (V = W_aligned - W_unaligned)")
        if path_kind(path, option) != "model":
            raise NlsrError(f"{option}: '{path}' is an adapter but --aligned is a model directory; give "
                            "all three as model directories (or all as adapters)")
    check_output_path(out, force)
    from nlsr.method.safelora import safelora_models
    from nlsr.weights.model_dirs import ModelDir

    result = safelora_models(ModelDir(aligned, "--aligned"), ModelDir(unaligned, "--unaligned"),
                             ModelDir(finetuned, "--finetuned"), out, threshold=threshold,
                             num_modules=num_modules, force=force)
    report = result.report()
    _say(f"projected {report['summary']['projected']} of {report['summary']['modules']} modules "
         f"(full-parameter SafeLoRA) -> {out}")
