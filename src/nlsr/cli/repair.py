"""The repair commands: ``nlsr extrapolate``, ``identify``, ``realign``, ``safelora``, ``inspect``.

Each command checks its arguments and input paths first and imports torch, transformers and PEFT only
after that. Entry granularity (the paper: LoRA factors entry by entry) and neuron granularity (weight
rows: fine-tunes of any rank, full fine-tunes as model directories) share one command each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.cli.common import (
    ADAPTER_CONFIG,
    AllowBaseMismatch,
    AllowMaskMismatch,
    AllowPickle,
    Epsilon,
    Force,
    Granularity,
    MinOriginCosine,
    PBase,
    Precision,
    Seed,
    Select,
    Threshold,
    Transplant,
    at_least,
    check_choice,
    check_device,
    check_precision,
    errors_to_exit,
    in_unit_interval,
    model_errors,
    require_adapter_dir,
    require_file,
    say,
)
from nlsr.errors import NlsrError
from nlsr.io import check_output_path
from nlsr.method import DEFAULT_Q, DEFAULT_TRANSPLANT, SELECTION_RULES, TRANSPLANTS
from nlsr.paths import check_model_spec
from nlsr.weights.model_dir_checks import model_dir_problem

REFERENCE_INFO = "nlsr_reference.json"  # written by `extrapolate` beside the reference adapter


def _identify_template(explicit: str | None, reference: Path) -> tuple[str, str]:
    """The template masks are made in: ``--template``, else the reference's record, else the default."""
    from nlsr.weights.records import DEFAULT_TEMPLATE, recorded_template

    if explicit is not None:
        return explicit, "--template"
    if recorded := recorded_template(reference):
        return recorded, f"recorded in {reference}"
    return DEFAULT_TEMPLATE, "the default; the reference records none"


def _reference_beta(reference: Path) -> float | None:
    """β of a reference adapter written by `nlsr extrapolate`, when it says."""
    try:
        return float(json.loads((reference / REFERENCE_INFO).read_text())["beta"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@errors_to_exit
def extrapolate(
    aligned: Annotated[Path, typer.Option(
        help="The safety-aligned LoRA adapter directory, or the aligned model directory (with --weak).")],
    out: Annotated[Path, typer.Option(help="Output adapter (or model) directory.")],
    beta: Annotated[float, typer.Option(help="ExPO strength: ΔW_e = (1+β) ΔW_a.")] = 0.9,
    weak: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Model directories: the weak model W_0 the aligned model came from; writes the model "
             "W_e = W_a + β (W_a - W_0).")] = None,
    scale_both: Annotated[bool, typer.Option(
        "--scale-both", help="Scale A and B by 1+β, as the authors' script does.")] = False,
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Step 1: the super-aligned reference adapter (or model) by ExPO extrapolation."""
    at_least("--beta", beta, 0)

    if path_kind(aligned, "--aligned") == "model":
        extrapolate_model(aligned=aligned, weak=weak, beta=beta, out=out, force=force)
        return
    if weak is not None:
        raise NlsrError("--weak is for model directories; for an adapter, --aligned is enough "
                        "(ΔW_e = (1+β) ΔW_a on the adapter's base)")
    require_adapter_dir(aligned, "--aligned")
    check_output_path(out, force)
    from nlsr.method.extrapolate import extrapolate as run
    from nlsr.weights.adapters import load_adapter, save_adapter
    from nlsr.weights.records import RECORD_FILE, record_bytes, recorded_template

    reference = run(load_adapter(aligned, allow_pickle), beta=beta, scale_both=scale_both)
    # what made it, for the masks identified on it (`nlsr identify` records beta)
    made = {"beta": beta, "scale_both": scale_both, "aligned": str(aligned)}
    extra = {REFERENCE_INFO: (json.dumps(made, indent=2) + "\n").encode()}
    if template := recorded_template(aligned):      # the reference answers in the aligned adapter's template
        extra[RECORD_FILE] = record_bytes(template=template)
    save_adapter(reference, out, force=force, extra_files=extra)
    say(f"reference adapter (beta={beta}, {len(reference)} modules) -> {out}")


@errors_to_exit
def identify(
    base: Annotated[str, typer.Option(help="The weak model W_0: 'smollm2', a directory or hub id.")],
    reference: Annotated[Path, typer.Option(help="The reference adapter directory.")],
    calibration: Annotated[Path, typer.Option(
        help='JSONL file of {"prompt", "response"} safety rows.')],
    out: Annotated[Path, typer.Option(help="Output mask file (.safetensors).")],
    rank_ratio: Annotated[float, typer.Option(help="ρ: keep k = ceil(ρ r) directions.")] = 0.8,
    keep: Annotated[float, typer.Option(help="q: fraction of entries marked per matrix.")] = DEFAULT_Q,
    limit: Annotated[Optional[int], typer.Option(help="Use the first N rows only.")] = None,  # noqa: UP045
    prompt_field: Annotated[str, typer.Option(help="JSON field holding the prompt.")] = "prompt",
    response_field: Annotated[str, typer.Option(
        help="JSON field holding the safe response (e.g. 'safe' for SPARD files).")] = "response",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 1024,
    template: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Prompt template: alpaca or chat (default: the one the reference records, else alpaca, as "
             "in the pipeline).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (auto).")] = None,  # noqa: UP045
    precision: Precision = None,
    device_map: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="'auto': spread a model too large for one device over the GPUs, then CPU memory, then "
             "--offload-folder (accelerate's big-model loading).")] = None,
    max_memory: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Memory caps for --device-map, e.g. '0=70GiB,1=70GiB,cpu=200GiB' (implies --device-map auto).")] = None,
    offload_folder: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Folder for the layers that fit nowhere else (implies --device-map auto).")] = None,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    allow_base_mismatch: Annotated[bool, typer.Option(
        "--allow-base-mismatch", help="Accept a --base other than the reference adapter's base model "
                                      "(e.g. the same model under another name).")] = False,
    granularity: Annotated[str, typer.Option(
        help="entry: masks over LoRA factor entries (the paper); neuron: masks over weight rows, for "
             "fine-tunes of any rank or full fine-tunes (--reference may then be a model directory, "
             "with --base the model its update is measured from).")] = "entry",
) -> None:
    """Step 2: safety-critical neuron masks from one streaming calibration pass."""
    at_least("--batch-size", batch_size, 1)
    at_least("--limit", limit, 1)
    at_least("--max-length", max_length, 1)
    in_unit_interval("--rank-ratio", rank_ratio)
    in_unit_interval("--keep", keep)
    from nlsr.data.templates import TEMPLATES

    check_choice("--template", template, TEMPLATES)
    check_precision(precision)

    check_choice("--granularity", granularity, GRANULARITY_NAMES)
    template, source = _identify_template(template, reference)
    if granularity == "neuron":
        if device_map or max_memory or offload_folder is not None:
            raise NlsrError("--granularity neuron does not support --device-map, --max-memory or "
                            "--offload-folder yet; load the model on one device")
        from nlsr.io import file_sha256

        made_from = {"reference": str(reference), "base": base, "beta": _reference_beta(reference),
                     "calibration": str(calibration)}
        if calibration.is_file():
            made_from["calibration_sha256"] = file_sha256(calibration)
        identify_neuron(base=base, reference=reference, calibration=calibration, out=out,
                        rank_ratio=rank_ratio, keep=keep, limit=limit, prompt_field=prompt_field,
                        response_field=response_field, batch_size=batch_size, max_length=max_length,
                        template=template, device=device, precision=precision, force=force,
                        allow_pickle=allow_pickle, allow_base_mismatch=allow_base_mismatch,
                        made_from=made_from)
        return
    refuse_model_dir(reference, "--reference", "identify")
    require_adapter_dir(reference, "--reference")
    require_file(calibration, "calibration file", 'give a JSONL file of {"prompt", "response"} rows')
    check_model_spec(base)
    check_output_path(out, force)
    from nlsr.io import file_sha256
    from nlsr.method.calibration import read_calibration_jsonl
    from nlsr.method.identify import identify as run
    from nlsr.method.masks import save_masks
    from nlsr.weights.adapters import load_adapter, same_base
    from nlsr.weights.models import load_model, load_tokenizer

    check_device(device)
    ref = load_adapter(reference, allow_pickle)
    if ref.base_model and not allow_base_mismatch and not same_base(ref.base_model, base):
        raise NlsrError(f"the reference adapter '{reference}' was trained on base model "
                        f"'{ref.base_model}' but --base is '{base}'; identify on the model the adapter "
                        "belongs to (the weak aligned model W_0), or pass --allow-base-mismatch if they "
                        "are the same model under two names")
    rows = read_calibration_jsonl(calibration, limit=limit, prompt_field=prompt_field,
                                  response_field=response_field)
    with model_errors(base):
        tokenizer = load_tokenizer(base)
    from nlsr.precision import resolve_precision

    chosen = resolve_precision(precision, device)
    say(chosen.line())
    with model_errors(base):
        model = load_model(base, device=device, precision=chosen.dtype, device_map=device_map,
                           max_memory=max_memory, offload_folder=offload_folder)
    made_from = {"reference": str(reference), "base": base, "beta": _reference_beta(reference),
                 "calibration": str(calibration), "calibration_sha256": file_sha256(calibration)}
    masks = run(model, ref, rows, tokenizer, rho=rank_ratio, q=keep, batch_size=batch_size,
                max_length=max_length, template=template, metadata=made_from)
    save_masks(masks, out, force=force)
    say(f"masks for {len(ref)} modules from {len(rows)} rows "
         f"({masks.metadata['response_tokens']} response tokens, {masks.metadata['template']} "
         f"template: {source}), density {masks.density():.3f} -> {out}")


@errors_to_exit
def realign(
    reference: Annotated[Path, typer.Option(help="The reference adapter directory.")],
    finetuned: Annotated[Path, typer.Option(help="The fine-tuned adapter to repair.")],
    masks: Annotated[Path, typer.Option(help="Mask file from `nlsr identify`.")],
    out: Annotated[Path, typer.Option(help="Output adapter directory.")],
    select: Select = "paper",
    transplant: Transplant = DEFAULT_TRANSPLANT,
    threshold: Threshold = None,
    p_base: PBase = 0.5,
    epsilon: Epsilon = 0.2,
    seed: Seed = 0,
    min_origin_cosine: MinOriginCosine = 0.5,
    allow_base_mismatch: AllowBaseMismatch = False,
    allow_mask_mismatch: AllowMaskMismatch = False,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    granularity: Granularity = "entry",
    base: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Neuron granularity, model directories: the model both updates are measured from.")] = None,
    rebase: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Neuron granularity, adapters: the adapter merged into the fine-tune's base (e.g. the "
             "aligned adapter for a fresh LoRA on the merged aligned model); the reference's update "
             "is taken relative to it.")] = None,
    template: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The template the repaired adapter records (default: the fine-tune's, else the masks'); "
             "needed to repair a fine-tune whose recorded template differs from the masks'.")] = None,
    self_check: Annotated[bool, typer.Option(
        "--self-check", help="Entry granularity: also measure what the transplant form alone changes (the "
                             "fine-tune repaired against itself, every module): self_transplant_change in "
                             "the report.")] = False,
) -> None:
    """Steps 3-4: pick the drifted modules and transplant the reference's safety neurons."""
    SELECTION_RULES.check(select, "--select")
    TRANSPLANTS.check(transplant, "--transplant")
    from nlsr.data.templates import TEMPLATES

    check_choice("--template", template, TEMPLATES)
    if select == "threshold" and threshold is None:
        raise NlsrError("the 'threshold' rule needs --threshold T (repair modules with S < T)")
    if not (p_base - epsilon >= 0 and p_base + epsilon <= 1):
        raise NlsrError(f"--p-base ± --epsilon must stay in [0, 1] (got {p_base} ± {epsilon})")
    if not min_origin_cosine <= 1:
        raise NlsrError(f"--min-origin-cosine is a cosine, at most 1 (got {min_origin_cosine}); 0 disables it")

    check_choice("--granularity", granularity, GRANULARITY_NAMES)
    if granularity == "neuron":
        realign_neuron(reference=reference, finetuned=finetuned, masks=masks, out=out, base=base,
                       rebase=rebase, template=template, select=select, threshold=threshold, p_base=p_base,
                       epsilon=epsilon, seed=seed, allow_base_mismatch=allow_base_mismatch,
                       allow_mask_mismatch=allow_mask_mismatch, force=force, allow_pickle=allow_pickle)
        return
    if base is not None or rebase is not None:
        raise NlsrError("--base and --rebase apply to --granularity neuron only")
    refuse_model_dir(reference, "--reference", "realign")
    refuse_model_dir(finetuned, "--finetuned", "realign")
    require_adapter_dir(reference, "--reference")
    require_adapter_dir(finetuned, "--finetuned")
    require_file(masks, "mask file", "make one with `nlsr identify`")
    check_output_path(out, force)
    from nlsr.experiment.plots import plot_similarity_by_layer
    from nlsr.method.checks import check_template
    from nlsr.method.masks import load_masks
    from nlsr.method.realign import describe_change, self_transplant_change, write_repaired
    from nlsr.method.realign import realign as run
    from nlsr.weights.adapters import load_adapter
    from nlsr.weights.records import recorded_template

    loaded = load_masks(masks)
    kept_template = check_template(loaded.metadata.get("template"), recorded_template(finetuned), template,
                                   f"the fine-tuned adapter '{finetuned}'")
    tuned = load_adapter(finetuned, allow_pickle, dtype=None)
    result = run(load_adapter(reference, allow_pickle), tuned,
                 loaded, select=select, transplant=transplant, threshold=threshold,
                 p_base=p_base, epsilon=epsilon, seed=seed, min_origin_cosine=min_origin_cosine,
                 check_base=not allow_base_mismatch, allow_mask_mismatch=allow_mask_mismatch,
                 granularity="entry")
    if self_check:      # what the form alone erases: the fine-tune repaired against itself, every module
        result.change["self_transplant_change"] = self_transplant_change(tuned, loaded, transplant)
    report = write_repaired(result, out, force, kept_template, reference=reference, finetuned=finetuned,
                            masks=masks)
    plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png")
    summary = report["summary"]
    say(f"repaired {summary['repaired']} of {summary['modules']} modules ({select}, "
         f"{transplant}) -> {out}")
    say(describe_change(summary))
    if self_check:
        say(f"the {transplant} form alone (the fine-tune repaired against itself, every module) changes the "
            f"update by {100 * summary['self_transplant_change']:.1f}%")
    for note in result.notes:
        say(note)


@errors_to_exit
def safelora(
    aligned: Annotated[Path, typer.Option(help="The safety-aligned adapter directory.")],
    finetuned: Annotated[Path, typer.Option(help="The fine-tuned adapter to project.")],
    out: Annotated[Path, typer.Option(help="Output adapter directory.")],
    unaligned: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Adapter of the unaligned model (default: the base itself, ΔW = 0).")] = None,
    threshold: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="Project modules with cos(CΔW, ΔW) < T (the NLSR paper: 0.6).")] = None,
    num_modules: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Project the K least similar modules (official default 10).")] = None,
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Baseline: SafeLoRA projection of the least aligned modules."""
    if (threshold is None) == (num_modules is None):
        raise NlsrError("give exactly one of --threshold T (project modules with cosine < T) or "
                        "--num-modules K (project the K least similar modules)")
    at_least("--num-modules", num_modules, 1)

    if path_kind(aligned, "--aligned") == "model":
        safelora_model(aligned=aligned, finetuned=finetuned, unaligned=unaligned, threshold=threshold,
                       num_modules=num_modules, out=out, force=force)
        return
    require_adapter_dir(aligned, "--aligned")
    require_adapter_dir(finetuned, "--finetuned")
    if unaligned is not None:
        require_adapter_dir(unaligned, "--unaligned")
    check_output_path(out, force)
    from nlsr.method.safelora import safelora as run
    from nlsr.weights.adapters import load_adapter, save_adapter

    result = run(load_adapter(aligned, allow_pickle), load_adapter(finetuned, allow_pickle, dtype=None),
                 unaligned=load_adapter(unaligned, allow_pickle) if unaligned else None,
                 threshold=threshold, num_modules=num_modules)
    report = result.report()
    save_adapter(result.adapter, out, force=force, extra_files={
        "safelora_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    say(f"projected {report['summary']['projected']} of {report['summary']['modules']} "
         f"modules -> {out}")


@errors_to_exit
def inspect(
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter directory.")],
    allow_pickle: AllowPickle = False,
) -> None:
    """Print an adapter's modules, ranks, scales and factor norms."""
    require_adapter_dir(adapter, "ADAPTER")
    from rich.console import Console
    from rich.table import Table

    from nlsr.weights.adapters import load_adapter

    loaded = load_adapter(adapter, allow_pickle)
    table = Table(title=f"{adapter} (base: {loaded.base_model})")
    for column in ("module", "rank", "scale", "A shape", "B shape", "|A|", "|B|"):
        table.add_column(column, no_wrap=True)
    for name, f in loaded:
        table.add_row(name, str(f.rank), f"{f.scale:g}", str(tuple(f.A.shape)),
                      str(tuple(f.B.shape)), f"{f.A.norm():.3g}", f"{f.B.norm():.3g}")
    # never cut module names: as wide as the table needs, even past the terminal (or 80 in a pipe)
    console = Console()
    needed = console.measure(table, options=console.options.update_width(100_000)).maximum
    console = Console(width=max(console.width, needed))
    console.print(table)
    say(f"{len(loaded)} modules, {loaded.num_parameters():,} parameters")


# ---- neuron granularity and model directories --------------------------------------------------

GRANULARITY_NAMES: tuple[str, ...] = ("entry", "neuron")


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
        say(chosen.line())
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
        say(chosen.line())
        with model_errors(str(reference)):
            model = load_model(str(reference), device=device, precision=chosen.dtype)
        made_from = {k: v for k, v in made_from.items() if k not in ("reference", "base")}
        masks = identify_model_dir(model, ref_dir, base_dir, rows, tokenizer, metadata=made_from,
                                       check_base=not allow_base_mismatch, **common)
        modules = len(masks.masks)
    save_masks(masks, out, force=force)
    say(f"neuron masks for {modules} modules from {len(rows)} rows "
         f"({masks.metadata['response_tokens']} response tokens, {masks.metadata['input_covariances']} "
         f"input covariances, {masks.metadata['template']} template), density {masks.density():.3f} -> {out}")


def realign_neuron(*, reference: Path, finetuned: Path, masks: Path, out: Path, base: Path | None,
                   rebase: Path | None, template: str | None, select: str, threshold: float | None, p_base: float,
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
    from nlsr.method.checks import check_template
    from nlsr.method.masks import load_masks
    from nlsr.method.realign import describe_change, write_repaired
    from nlsr.weights.records import recorded_template

    loaded = load_masks(masks)
    kept_template = check_template(loaded.metadata.get("template"), recorded_template(finetuned), template,
                                   f"the fine-tuned model '{finetuned}'")
    rule = dict(select=select, threshold=threshold, p_base=p_base, epsilon=epsilon, seed=seed,
                check_base=not allow_base_mismatch, allow_mask_mismatch=allow_mask_mismatch)
    if ref_kind == "adapter":
        from nlsr.method.realign import realign
        from nlsr.weights.adapters import load_adapter

        result = realign(
            load_adapter(reference, allow_pickle), load_adapter(finetuned, allow_pickle, dtype=None), loaded,
            rebase=load_adapter(rebase, allow_pickle) if rebase is not None else None, granularity="neuron",
            **rule)
        report = write_repaired(result, out, force, kept_template, reference=reference, finetuned=finetuned,
                               masks=masks)
    else:
        from nlsr.method.realign import realign_model_dir
        from nlsr.weights.model_dirs import ModelDir

        result = realign_model_dir(ModelDir(reference, "--reference"), ModelDir(finetuned, "--finetuned"),
                                       ModelDir(base, "--base"), loaded, out, force=force, **rule)
        report = result.report()
    plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png")
    for note in result.notes:
        say(note)
    summary = report["summary"]
    say(f"repaired {summary['repaired']} of {summary['modules']} modules ({select}, neuron granularity, "
         f"{summary['rows_replaced']} rows from the reference) -> {out}")
    say(describe_change(summary))


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
    say(f"reference model W_a + {beta} (W_a - W_0): {len(changed)} tensors extrapolated, the rest "
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
    say(f"projected {report['summary']['projected']} of {report['summary']['modules']} modules "
         f"(full-parameter SafeLoRA) -> {out}")
