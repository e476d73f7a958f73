"""The experiment commands: ``nlsr run``, ``validate``, ``export``, ``compare``, ``ls``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.cli.common import (
    Force,
    Precision,
    check_precision,
    errors_to_exit,
    require_dir,
    say,
)
from nlsr.errors import NlsrError
from nlsr.io import check_output_path
from nlsr.method import SELECTION_RULES, TRANSPLANTS

Overrides = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--set", help="Override a config value: section.field=value (YAML value); repeatable.")]


@errors_to_exit
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
        say(f"stopped after '{until}' (--until); its outputs are in {run_dir}")
        return
    report = run_dir / "report" / "report.md"
    say(report.read_text())
    say(f"report: {report}")


@errors_to_exit
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
    from nlsr.paths import describe_data_dir

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
    say(f"data folder: {describe_data_dir(ctx.data_dir)}")
    say(f"config '{config}' is valid; data: {', '.join(lines)}")
    for gate_line in (g for r in results for g in r.get("gate_lines", [])):
        say(f"gate: {gate_line}")
    say("stages: " + ", ".join(s.name for s in build_stages(cfg)))


EXPORTED_REPORT_FILES = ("report.md", "results.json", "summary.json", "timings.json", "manifest.json",
                         "sweep.json", "manifests.json")


def is_export_output(name: str) -> bool:
    """Whether ``name`` is a file `nlsr export` writes: ``--force`` replaces those and keeps the rest
    of the folder (a README written beside the export, say)."""
    return (name in EXPORTED_REPORT_FILES or name.endswith(".png")
            or name.endswith((".report.json", ".data_card.json", ".train_log.json")))


@errors_to_exit
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
        (tmp / "manifests.json").write_text(json.dumps(manifests, indent=2) + "\n")
    say(f"exported {len(manifests)} stage manifests and the report to {out}")


@errors_to_exit
def compare(
    runs: Annotated[list[Path], typer.Argument(
        help="Finished run folders (or their exports), one per setting; or `nlsr evaluate` output folders, "
             "the first the baseline (e.g. before and after a repair).")],
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Output folder for comparison.md/.json (and, for runs, the HS-vs-FA plots).")] = None,
    judge: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="Judge(s) to tabulate (default: every judge in the runs).")] = None,
    force: Force = False,
) -> None:
    """Runs: one table across settings in the paper's layout (rows = methods, HS / FA), with the paper's
    numbers. Evaluations: paired differences against the first, with 95% intervals."""
    for run_dir in runs:
        require_dir(run_dir, "run folder")
    from nlsr.evaluation.paired import is_evaluation

    evaluations = [is_evaluation(r) for r in runs]
    if any(evaluations):
        if not all(evaluations):
            odd = [str(r) for r, e in zip(runs, evaluations, strict=True) if not e]
            raise NlsrError(f"{', '.join(odd)} are not `nlsr evaluate` outputs; compare evaluation folders "
                            "with each other, or run folders with each other")
        if out is not None:
            check_output_path(out, force)
        from nlsr.evaluation.paired import compare_evaluations, comparison_table

        result = compare_evaluations(runs)
        table = comparison_table(result)
        if out is not None:
            from nlsr.io import atomic_dir, write_json

            with atomic_dir(out, force=force) as tmp:
                write_json(tmp / "comparison.json", result)
                (tmp / "comparison.md").write_text(table + "\n")
        say(table)
        return
    if out is None:
        raise NlsrError("comparing run folders writes tables and plots: give --out FOLDER")
    check_output_path(out, force)
    from nlsr.experiment.comparison import write_comparison

    settings = write_comparison(runs, out, judge, force=force)
    say(f"compared {len(settings)} settings ({', '.join(s.title for s in settings)}) -> {out}")


@errors_to_exit
def list_registries() -> None:
    """List every registry (data sets, tasks, judges, selection rules, transplant forms, defences)."""
    from nlsr.data import DATASETS, TASKS  # importing nlsr.data registers its data sets
    from nlsr.evaluation.judges import JUDGES
    from nlsr.training.defences import DEFENCES

    registries = (("data sets", DATASETS, "kind"), ("tasks", TASKS, None), ("judges (--judge)", JUDGES, None),
                  ("selection rules (--select)", SELECTION_RULES, None),
                  ("transplant forms (--transplant)", TRANSPLANTS, None), ("defences", DEFENCES, "stage"))
    for title, registry, column in registries:
        say(f"{title}:")
        for name in registry:
            entry = registry.info(name)
            tag = f"{entry.meta[column]:<12}" if column else ""
            say(f"  {name:<28} {tag}{entry.summary}")
