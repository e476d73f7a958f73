"""The ``nlsr`` command line: one command per step, each a thin wrapper over the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.cli_common import errors_to_exit as _errors_to_exit
from nlsr.errors import NlsrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neuron-Level Safety Realignment (NLSR) of LoRA-fine-tuned LLMs.")

Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept adapter_model.bin (pickle) files; only for trusted files.")]


def _say(message: str) -> None:
    typer.echo(message)


@app.command()
@_errors_to_exit
def extrapolate(
    aligned: Annotated[Path, typer.Option(help="The safety-aligned LoRA adapter directory.")],
    out: Annotated[Path, typer.Option(help="Output adapter directory.")],
    beta: Annotated[float, typer.Option(help="ExPO strength: ΔW_e = (1+β) ΔW_a.")] = 0.9,
    scale_both: Annotated[bool, typer.Option(
        "--scale-both", help="Scale A and B by 1+β, as the authors' script does.")] = False,
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Step 1: the super-aligned reference adapter by ExPO extrapolation."""
    from nlsr.adapters import load_adapter, save_adapter
    from nlsr.io import check_output_path
    from nlsr.reference import extrapolate as run

    check_output_path(out, force)
    reference = run(load_adapter(aligned, allow_pickle), beta=beta, scale_both=scale_both)
    save_adapter(reference, out, force=force)
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
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 ... (auto).")] = None,  # noqa: UP045
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Step 2: safety-critical neuron masks from one streaming calibration pass."""
    from nlsr.adapters import load_adapter
    from nlsr.calibration import read_calibration_jsonl
    from nlsr.identification import identify as run
    from nlsr.identification import save_masks
    from nlsr.io import check_output_path
    from nlsr.models import load_model, load_tokenizer

    check_output_path(out, force)
    ref = load_adapter(reference, allow_pickle)
    rows = read_calibration_jsonl(calibration, limit=limit, prompt_field=prompt_field,
                                  response_field=response_field)
    tokenizer = load_tokenizer(base)
    model = load_model(base, device=device, dtype=dtype)
    masks = run(model, ref, rows, tokenizer, rho=rank_ratio, q=keep, batch_size=batch_size,
                max_length=max_length, template=template)
    masks.metadata.update({"reference": str(reference), "calibration": str(calibration),
                           "base": base})
    save_masks(masks, out, force=force)
    _say(f"masks for {len(ref)} modules from {len(rows)} rows "
         f"({masks.metadata['response_tokens']} response tokens), density "
         f"{masks.density():.3f} -> {out}")


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
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Steps 3-4: pick the drifted modules and transplant the reference's safety neurons."""
    from nlsr.adapters import load_adapter, save_adapter
    from nlsr.identification import load_masks
    from nlsr.io import check_output_path
    from nlsr.plots import plot_similarity_by_layer
    from nlsr.realignment import realign as run

    check_output_path(out, force)
    result = run(load_adapter(reference, allow_pickle), load_adapter(finetuned, allow_pickle),
                 load_masks(masks), select=select, transplant=transplant, threshold=threshold,
                 p_base=p_base, epsilon=epsilon, seed=seed, min_origin_cosine=min_origin_cosine,
                 check_base=not allow_base_mismatch)
    report = result.report()
    report["settings"].update({"reference": str(reference), "finetuned": str(finetuned),
                               "masks": str(masks)})
    save_adapter(result.adapter, out, force=force, extra_files={
        "realign_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    plot_similarity_by_layer(result.decisions, out / "similarity_by_layer.png")
    summary = report["summary"]
    _say(f"repaired {summary['repaired']} of {summary['modules']} modules ({select}, "
         f"{transplant}) -> {out}")


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
    from nlsr.adapters import load_adapter, save_adapter
    from nlsr.defences.safelora import safelora as run
    from nlsr.io import check_output_path

    check_output_path(out, force)
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
    from rich.console import Console
    from rich.table import Table

    from nlsr.adapters import load_adapter

    loaded = load_adapter(adapter, allow_pickle)
    table = Table(title=f"{adapter} (base: {loaded.base_model})")
    for column in ("module", "rank", "scale", "A shape", "B shape", "|A|", "|B|"):
        table.add_column(column)
    for name, f in loaded:
        table.add_row(name, str(f.rank), f"{f.scale:g}", str(tuple(f.A.shape)),
                      str(tuple(f.B.shape)), f"{f.A.norm():.3g}", f"{f.B.norm():.3g}")
    Console().print(table)
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
) -> None:
    """Run the whole experiment: data, align, attack, identify, realign, evaluate, report.

    Finished stages whose inputs did not change are skipped; an interrupted run resumes."""
    from nlsr.config import load_config
    from nlsr.experiment import run_experiment

    cfg = load_config(config, overrides)
    run_dir = run_experiment(cfg, force=set(force or []), data=data_dir)
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

    from nlsr.config import load_config
    from nlsr.experiment import build_stages
    from nlsr.paths import data_dir as resolve_data_dir
    from nlsr.pipeline import RunContext
    from nlsr.stages import data as data_stage

    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(cfg, Path(tmp), resolve_data_dir(data_dir if data_dir else cfg.data_dir))
        lines = [step(ctx, Path(tmp), {})["line"] for step in (data_stage.run_align, data_stage.run_task)]
    _say(f"config '{config}' is valid; data: {', '.join(lines)}")
    _say("stages: " + ", ".join(s.name for s in build_stages(cfg)))


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

    from nlsr.io import atomic_dir
    from nlsr.pipeline import read_manifest

    report = run_dir / "report"
    if read_manifest(report) is None:
        raise NlsrError(f"'{run_dir}' has no finished report stage; run `nlsr run` to the end first")
    manifests = {}
    with atomic_dir(out, force=force) as tmp:
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
    from nlsr.comparison import write_comparison

    settings = write_comparison(runs, out, judge, force=force)
    _say(f"compared {len(settings)} settings ({', '.join(s.title for s in settings)}) -> {out}")


@app.command(name="ls")
@_errors_to_exit
def list_registries() -> None:
    """List the registered data sets, tasks, judges, selection rules and transplant forms."""
    from nlsr.data import TASKS, list_datasets
    from nlsr.judges import JUDGES
    from nlsr.ops.layers import SELECTION_RULES
    from nlsr.ops.transplant import TRANSPLANTS

    _say("datasets:")
    for spec in list_datasets():
        _say(f"  {spec.name:<28} {spec.kind:<11} {spec.description}")
    _say("tasks: " + ", ".join(TASKS))
    _say("judges: " + ", ".join(JUDGES))
    _say("selection rules: " + ", ".join(SELECTION_RULES))
    _say("transplants: " + ", ".join(TRANSPLANTS))


def _register_judge_commands() -> None:
    from nlsr.cli_judge import judge_app

    app.add_typer(judge_app, name="judge", help="Train and validate harmfulness judges.")


_register_judge_commands()


if __name__ == "__main__":
    app()
