"""``nlsr judge``: train the offline harmfulness judge and measure any judge's agreement.

A typer sub-app, registered in :mod:`nlsr.cli` with ``app.add_typer(judge_app, name="judge")``;
it does not import :mod:`nlsr.cli` (that would be circular).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nlsr.choices import JUDGE_NAMES, check_choice
from nlsr.cli_common import at_least, require_dir
from nlsr.cli_common import errors_to_exit as _errors_to_exit
from nlsr.errors import NlsrError

judge_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Harmfulness judges: train the offline judge, measure agreement.")

DataDir = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    help="The offline data folder (default: $NLSR_DATA_DIR or shared/data).")]
MaxPrompts = Annotated[Optional[int], typer.Option(  # noqa: UP045
    help="Use at most N prompts per source (quick runs).")]

_COLUMNS = ("n", "accuracy", "precision", "recall", "f1", "cohen_kappa", "flagged_rate", "label_rate")


def agreement_table(per_source: dict[str, dict[str, Any]], title: str = "") -> str:
    """A plain-text table: one row per source, one column per agreement metric."""
    lines = [title] if title else []
    lines.append(f"{'source':<16}" + "".join(f"{c:>13}" for c in _COLUMNS))
    for source, metrics in per_source.items():
        cells = [f"{metrics[c]:>13d}" if c == "n" else f"{metrics[c]:>13.3f}" for c in _COLUMNS]
        lines.append(f"{source:<16}" + "".join(cells))
    return "\n".join(lines)


@judge_app.command()
@_errors_to_exit
def train(
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="A new (or empty) output folder. The default judge (<cache>/judges/trained-v2, trained on "
             "first use) is replaced only when named here with --force.")] = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split.")] = 0,
    max_prompts: MaxPrompts = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")] = False,
) -> None:
    """Train the TF-IDF + logistic-regression judge into a new folder; print its held-out agreement.

    The folder gets the judge, ``metrics.json`` and ``training_rows.jsonl`` (every labelled row
    with its split). Use it in a run with ``evaluate.judges: [{name: trained, model: FOLDER}]``.
    """
    at_least("--max-prompts", max_prompts, 1)
    if data_dir is not None:
        require_dir(data_dir, "data directory")
    from nlsr.judges.training import default_dir, train_judge

    if out is None:
        raise NlsrError(f"give --out FOLDER, a new folder for the judge; the default judge ({default_dir()}) "
                        "is trained on first use and replaced only with --out DEFAULT_FOLDER --force")
    is_default = out.resolve() == default_dir().resolve()
    if is_default and not force:
        raise NlsrError(f"--out '{out}' is the default judge that every run uses; pass --force to replace "
                        "it, or choose another folder")
    if is_default:
        default_dir().parent.mkdir(parents=True, exist_ok=True)
    empty_dir = out.is_dir() and not any(out.iterdir())   # a fresh, empty folder is a new folder
    from nlsr.io import check_output_path

    check_output_path(out, force or empty_dir)
    metrics = train_judge(data_dir, out, seed=seed, max_prompts=max_prompts, force=force or empty_dir)
    typer.echo(f"trained judge (text: {metrics['text']}, C={metrics['C']}) -> {out}")
    typer.echo(agreement_table(metrics["heldout"], "held-out agreement, trained judge:"))
    typer.echo(agreement_table(metrics["refusal_heldout"], "held-out agreement, refusal judge:"))
    if not is_default:
        typer.echo(f"use it in a config with evaluate.judges: [{{name: trained, model: {out}}}]")


@judge_app.command()
@_errors_to_exit
def validate(
    judge: Annotated[str, typer.Option(help="Judge name: refusal, trained, beaverdam, llamaguard.")],
    model: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The judge's model: a trained judge folder, or a moderation model folder or hub id.")] = None,
    data_dir: DataDir = None,
    seed: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Split seed (default: the trained judge's own seed, else 0).")] = None,
    max_prompts: MaxPrompts = None,
    device: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Moderation models: cpu, cuda, cuda:1 ... (auto).")] = None,
    precision: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Moderation models: auto, float32 or bfloat16 (auto = bf16 where the hardware has it).")] = None,
) -> None:
    """Print a judge's agreement with the held-out labelled responses, per source."""
    check_choice("judge", judge, JUDGE_NAMES)
    at_least("--max-prompts", max_prompts, 1)
    if data_dir is not None:
        require_dir(data_dir, "data directory")
    from nlsr.judges import agreement, heldout_rows, make_judge

    params: dict[str, Any] = {}
    if model is not None:
        params["model"] = model
    if judge == "trained" and model is None and data_dir is not None:
        params["data_dir"] = data_dir
    if judge in ("beaverdam", "llamaguard"):
        params.update(device=device, precision=precision)
    built = make_judge(judge, **params)
    if seed is None:
        seed = int(getattr(built, "meta", {}).get("seed", 0))
    rows = heldout_rows(data_dir, seed=seed, max_prompts=max_prompts)
    per_source = {source: agreement(built, subset) for source, subset in rows.items() if subset}
    typer.echo(agreement_table(per_source, f"held-out agreement, {judge} judge (split seed {seed}):"))
