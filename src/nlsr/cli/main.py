"""The ``nlsr`` command line: one command per step, each a thin wrapper over the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.choices import SELECTION_RULE_NAMES, TEMPLATE_NAMES, TRANSPLANT_NAMES, check_choice
from nlsr.cli.batch import realign_batch
from nlsr.cli.common import (
    at_least,
    check_device,
    check_precision,
    in_unit_interval,
    model_errors,
    require_adapter_dir,
    require_dir,
    require_file,
    set_debug,
)
from nlsr.cli.common import errors_to_exit as _errors_to_exit
from nlsr.errors import NlsrError
from nlsr.io import check_output_path
from nlsr.paths import check_model_spec

# Commands check their arguments and input paths first and import torch, transformers, peft and
# TRL only after that (inside the command), so that `nlsr --help` and a typo answer at once.
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neuron-Level Safety Realignment (NLSR) of LoRA-fine-tuned LLMs.")


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an error instead of one line (or set NLSR_DEBUG=1).")]
          = False) -> None:
    set_debug(debug)


Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept adapter_model.bin (pickle) files; only for trusted files.")]
Precision = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="auto, float32 or bfloat16. auto (default) = bfloat16 where the GPU or CPU computes it "
         "natively (AVX512-BF16/AMX), else float32.")]


def _say(message: str) -> None:
    typer.echo(message)


REFERENCE_INFO = "nlsr_reference.json"  # written by `extrapolate` beside the reference adapter


def _reference_beta(reference: Path) -> float | None:
    """β of a reference adapter written by `nlsr extrapolate`, when it says."""
    try:
        return float(json.loads((reference / REFERENCE_INFO).read_text())["beta"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@app.command()
@_errors_to_exit
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
    from nlsr.cli.repair_rows import extrapolate_model, path_kind

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

    reference = run(load_adapter(aligned, allow_pickle), beta=beta, scale_both=scale_both)
    # what made it, for the masks identified on it (`nlsr identify` records beta)
    made = {"beta": beta, "scale_both": scale_both, "aligned": str(aligned)}
    save_adapter(reference, out, force=force,
                 extra_files={REFERENCE_INFO: (json.dumps(made, indent=2) + "\n").encode()})
    _say(f"reference adapter (beta={beta}, {len(reference)} modules) -> {out}")


@app.command()
@_errors_to_exit
def identify(
    base: Annotated[str, typer.Option(help="The weak model W_0: 'smollm2', a directory or hub id.")],
    reference: Annotated[Path, typer.Option(help="The reference adapter directory.")],
    calibration: Annotated[Path, typer.Option(
        help='JSONL file of {"prompt", "response"} safety rows.')],
    out: Annotated[Path, typer.Option(help="Output mask file (.safetensors).")],
    rank_ratio: Annotated[float, typer.Option(help="ρ: keep k = ceil(ρ r) directions.")] = 0.8,
    keep: Annotated[float, typer.Option(help="q: fraction of entries marked per matrix.")] = 0.2,
    limit: Annotated[Optional[int], typer.Option(help="Use the first N rows only.")] = None,  # noqa: UP045
    prompt_field: Annotated[str, typer.Option(help="JSON field holding the prompt.")] = "prompt",
    response_field: Annotated[str, typer.Option(
        help="JSON field holding the safe response (e.g. 'safe' for SPARD files).")] = "response",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 1024,
    template: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Prompt template: chat or alpaca (default: chat when the tokenizer has one).")] = None,
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
    check_choice("--template", template, TEMPLATE_NAMES)
    check_precision(precision)
    from nlsr.cli.repair_rows import GRANULARITY_NAMES, identify_neuron, refuse_model_dir

    check_choice("--granularity", granularity, GRANULARITY_NAMES)
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
    _say(chosen.line())
    with model_errors(base):
        model = load_model(base, device=device, precision=chosen.dtype, device_map=device_map,
                           max_memory=max_memory, offload_folder=offload_folder)
    made_from = {"reference": str(reference), "base": base, "beta": _reference_beta(reference),
                 "calibration": str(calibration), "calibration_sha256": file_sha256(calibration)}
    masks = run(model, ref, rows, tokenizer, rho=rank_ratio, q=keep, batch_size=batch_size,
                max_length=max_length, template=template, metadata=made_from)
    save_masks(masks, out, force=force)
    _say(f"masks for {len(ref)} modules from {len(rows)} rows "
         f"({masks.metadata['response_tokens']} response tokens, {masks.metadata['template']} "
         f"template), density {masks.density():.3f} -> {out}")


@app.command()
@_errors_to_exit
def realign(
    reference: Annotated[Path, typer.Option(help="The reference adapter directory.")],
    finetuned: Annotated[Path, typer.Option(help="The fine-tuned adapter to repair.")],
    masks: Annotated[Path, typer.Option(help="Mask file from `nlsr identify`.")],
    out: Annotated[Path, typer.Option(help="Output adapter directory.")],
    select: Annotated[str, typer.Option(
        help="Module selection: paper, reverse, threshold or all.")] = "paper",
    transplant: Annotated[str, typer.Option(
        help="exact (rank 2r, the paper's formula) or factor (rank r, authors' code).")] = "exact",
    threshold: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="τ for --select threshold: repair modules with S < τ.")] = None,
    p_base: Annotated[float, typer.Option(help="P_L of the probabilistic rules.")] = 0.5,
    epsilon: Annotated[float, typer.Option(help="ε of the probabilistic rules.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the probabilistic draw.")] = 0,
    min_origin_cosine: Annotated[float, typer.Option(
        help="Refuse when the median cosine of A_e and A_t is below this (0 disables).")] = 0.5,
    allow_base_mismatch: Annotated[bool, typer.Option(
        "--allow-base-mismatch", help="Accept adapters that name different base models.")] = False,
    allow_mask_mismatch: Annotated[bool, typer.Option(
        "--allow-mask-mismatch", help="Experts: accept masks recorded for another reference adapter, "
                                      "an older masks file without a record, or masks of extra modules.")] = False,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    granularity: Annotated[str, typer.Option(
        help="entry (the paper: the fine-tune continues the aligned adapter) or neuron (weight rows: a "
             "LoRA of any rank/initialisation, or model directories with --base).")] = "entry",
    base: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Neuron granularity, model directories: the model both updates are measured from.")] = None,
    rebase: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Neuron granularity, adapters: the adapter merged into the fine-tune's base (e.g. the "
             "aligned adapter for a fresh LoRA on the merged aligned model); the reference's update "
             "is taken relative to it.")] = None,
) -> None:
    """Steps 3-4: pick the drifted modules and transplant the reference's safety neurons."""
    check_choice("--select", select, SELECTION_RULE_NAMES)
    check_choice("--transplant", transplant, TRANSPLANT_NAMES)
    if select == "threshold" and threshold is None:
        raise NlsrError("the 'threshold' rule needs --threshold T (repair modules with S < T)")
    if not (p_base - epsilon >= 0 and p_base + epsilon <= 1):
        raise NlsrError(f"--p-base ± --epsilon must stay in [0, 1] (got {p_base} ± {epsilon})")
    if not min_origin_cosine <= 1:
        raise NlsrError(f"--min-origin-cosine is a cosine, at most 1 (got {min_origin_cosine}); 0 disables it")
    from nlsr.cli.repair_rows import GRANULARITY_NAMES, realign_neuron, refuse_model_dir

    check_choice("--granularity", granularity, GRANULARITY_NAMES)
    if granularity == "neuron":
        realign_neuron(reference=reference, finetuned=finetuned, masks=masks, out=out, base=base,
                       rebase=rebase, select=select, threshold=threshold, p_base=p_base,
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
    from nlsr.method.masks import load_masks
    from nlsr.method.realign import realign as run
    from nlsr.weights.adapters import load_adapter, save_adapter

    result = run(load_adapter(reference, allow_pickle), load_adapter(finetuned, allow_pickle, dtype=None),
                 load_masks(masks), select=select, transplant=transplant, threshold=threshold,
                 p_base=p_base, epsilon=epsilon, seed=seed, min_origin_cosine=min_origin_cosine,
                 check_base=not allow_base_mismatch, allow_mask_mismatch=allow_mask_mismatch,
                 granularity="entry")
    report = result.report()
    report["settings"].update({"reference": str(reference), "finetuned": str(finetuned),
                               "masks": str(masks)})
    save_adapter(result.adapter, out, force=force, extra_files={
        "realign_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png")
    summary = report["summary"]
    _say(f"repaired {summary['repaired']} of {summary['modules']} modules ({select}, "
         f"{transplant}) -> {out}")


app.command("realign-batch")(realign_batch)


@app.command()
@_errors_to_exit
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
    from nlsr.cli.repair_rows import path_kind, safelora_model

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

    result = run(load_adapter(aligned, allow_pickle), load_adapter(finetuned, allow_pickle),
                 unaligned=load_adapter(unaligned, allow_pickle) if unaligned else None,
                 threshold=threshold, num_modules=num_modules)
    report = result.report()
    save_adapter(result.adapter, out, force=force, extra_files={
        "safelora_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    _say(f"projected {report['summary']['projected']} of {report['summary']['modules']} "
         f"modules -> {out}")


@app.command()
@_errors_to_exit
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
    _say(f"{len(loaded)} modules, {loaded.num_parameters():,} parameters")


Overrides = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--set", help="Override a config value: section.field=value (YAML value); repeatable.")]


@app.command()
@_errors_to_exit
def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/smoke.yaml.")],
    overrides: Overrides = None,
    force: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="Rerun this stage even if it is done ('all' for every stage); repeatable.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Offline data folder (default: NLSR_DATA_DIR or shared/data).")] = None,
    precision: Precision = None,
    until: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Stop after this stage (and what it needs), e.g. 'data-align' to build only the data.")] = None,
    accept_code_change: Annotated[bool, typer.Option(
        "--accept-code-change", help="Keep finished stages made by another commit of nlsr when nothing else "
        "differs (parameters, data, inputs); each is logged. For code changes that cannot change them.")] = False,
) -> None:
    """Run the whole experiment: data, align, attack, identify, realign, evaluate, report.

    Finished stages whose inputs did not change are skipped; an interrupted run resumes."""
    check_precision(precision)
    if data_dir is not None:
        require_dir(data_dir, "data directory")
    from nlsr.experiment.config import load_config

    cfg = load_config(config, [*(overrides or []), *([f"precision={precision}"] if precision else [])])
    from nlsr.experiment.plan import run_experiment

    try:
        run_dir = run_experiment(cfg, force=set(force or []), data=data_dir, until=until,
                                 accept_code_change=accept_code_change)
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume (finished stages are kept, training "
                    "continues from its last checkpoint, generation from its last batch)", err=True)
        raise typer.Exit(130) from None
    if until is not None and until != "report":
        _say(f"stopped after '{until}' (--until); its outputs are in {run_dir}")
        return
    report = run_dir / "report" / "report.md"
    _say(report.read_text())
    _say(f"report: {report}")


@app.command()
@_errors_to_exit
def validate(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML).")],
    overrides: Overrides = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Offline data folder.")] = None,  # noqa: UP045
) -> None:
    """Check a config and its data sets without training anything; list the stages it would run."""
    import tempfile

    if data_dir is not None:
        require_dir(data_dir, "data directory")
    from nlsr.experiment.config import load_config
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.plan import build_stages
    from nlsr.experiment.stages import data as data_stage
    from nlsr.paths import data_dir as resolve_data_dir

    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(cfg, Path(tmp), resolve_data_dir(data_dir if data_dir else cfg.data_dir))
        folders = {name: Path(tmp) / name for name in ("data-align", "data", "data-attack")}
        results = []
        for name, step in (("data-align", data_stage.run_align), ("data", data_stage.run_eval),
                           ("data-attack", data_stage.run_attack_data)):
            folders[name].mkdir()
            results.append(step(ctx, folders[name], folders))
    lines = [r["line"] for r in results]
    _say(f"config '{config}' is valid; data: {', '.join(lines)}")
    for gate_line in (g for r in results for g in r.get("gate_lines", [])):
        _say(f"gate: {gate_line}")
    _say("stages: " + ", ".join(s.name for s in build_stages(cfg)))


EXPORTED_REPORT_FILES = ("report.md", "results.json", "summary.json", "timings.json", "manifest.json",
                         "sweep.json", "manifests.json")


def is_export_output(name: str) -> bool:
    """Whether ``name`` is a file `nlsr export` writes: ``--force`` replaces those and keeps the rest
    of the folder (a README written beside the export, say)."""
    return (name in EXPORTED_REPORT_FILES or name.endswith(".png")
            or name.endswith((".report.json", ".data_card.json", ".train_log.json")))


@app.command()
@_errors_to_exit
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder, e.g. runs/cpu-bench.")],
    out: Annotated[Path, typer.Argument(help="Where to copy the small reports (e.g. results/cpu-bench).")],
    force: Force = False,
) -> None:
    """Copy a run's small outputs (report, plots, manifests, data card, realign reports) for committing.

    Models, adapters and generations stay behind."""
    import shutil

    from nlsr.experiment.pipeline import read_manifest
    from nlsr.io import atomic_dir

    require_dir(run_dir, "run folder")
    check_output_path(out, force)
    report = run_dir / "report"
    if read_manifest(report) is None:
        raise NlsrError(f"'{run_dir}' has no finished report stage; run `nlsr run` to the end first")
    manifests = {}
    with atomic_dir(out, force=force, owned=is_export_output) as tmp:
        for path in report.iterdir():
            if path.suffix in (".md", ".json", ".png"):
                shutil.copy(path, tmp / path.name)
        for stage in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial")):
            manifest = read_manifest(stage)
            if manifest is not None:
                manifests[stage.name] = manifest
            for name in ("report.json", "data_card.json", "train_log.json"):
                source = stage / name if name != "train_log.json" else stage / "adapter" / name
                if source.exists():
                    shutil.copy(source, tmp / f"{stage.name}.{name}")
            for log in sorted(stage.glob("seeds/*/adapter/train_log.json")):   # align.dpo.seeds: one per run
                shutil.copy(log, tmp / f"{stage.name}.{log.parent.parent.name}.train_log.json")
        (tmp / "manifests.json").write_text(json.dumps(manifests, indent=2) + "\n")
    _say(f"exported {len(manifests)} stage manifests and the report to {out}")


@app.command()
@_errors_to_exit
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders or their exports, one per setting.")],
    out: Annotated[Path, typer.Option(help="Output folder for comparison.md/.json and the HS-vs-FA plots.")],
    judge: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="Judge(s) to tabulate (default: every judge in the runs).")] = None,
    force: Force = False,
) -> None:
    """One table across settings in the paper's layout (rows = methods, HS / FA), with the paper's numbers."""
    for run_dir in runs:
        require_dir(run_dir, "run folder")
    check_output_path(out, force)
    from nlsr.experiment.comparison import write_comparison

    settings = write_comparison(runs, out, judge, force=force)
    _say(f"compared {len(settings)} settings ({', '.join(s.title for s in settings)}) -> {out}")


@app.command(name="ls")
@_errors_to_exit
def list_registries() -> None:
    """List the registered data sets, tasks, judges, selection rules and transplant forms."""
    from nlsr.data import TASKS, list_datasets
    from nlsr.evaluation.judges import JUDGES
    from nlsr.method.select import SELECTION_RULES
    from nlsr.method.transplant import TRANSPLANTS

    _say("datasets:")
    for spec in list_datasets():
        _say(f"  {spec.name:<28} {spec.kind:<11} {spec.description}")
    _say("tasks: " + ", ".join(TASKS))
    _say("judges: " + ", ".join(JUDGES))
    _say("selection rules: " + ", ".join(SELECTION_RULES))
    _say("transplants: " + ", ".join(TRANSPLANTS))


def _register_judge_commands() -> None:
    from nlsr.cli.judge import judge_app

    app.add_typer(judge_app, name="judge", help="Train and validate harmfulness judges.")


_register_judge_commands()


if __name__ == "__main__":
    app()
