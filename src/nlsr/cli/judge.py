"""``nlsr judge``: train the offline harmfulness judge and measure any judge's agreement.

A typer sub-app, registered in :mod:`nlsr.cli` with ``app.add_typer(judge_app, name="judge")``;
it does not import :mod:`nlsr.cli` (that would be circular).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nlsr.cli.common import at_least, check_choice, require_dir
from nlsr.cli.common import errors_to_exit as _errors_to_exit
from nlsr.errors import NlsrError
from nlsr.evaluation.judges import JUDGES

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
        help="A new (or empty) output folder. The default judge (<cache>/judges/trained-v3, trained on "
             "first use) is replaced only when named here with --force.")] = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split.")] = 0,
    max_prompts: MaxPrompts = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")] = False,
    kind: Annotated[str, typer.Option(
        help="trained (TF-IDF + logistic regression) or hidden (logistic regression on SmolLM2 hidden "
             "states, trained only on judge-reserved, evaluation-gated rows).")] = "trained",
    features_cache: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="hidden: an .npy file to cache the extracted features in (reused when the rows match).")] = None,
    gated: Annotated[bool, typer.Option(
        "--gated", help="trained: train on the gated rows (judge-reserved prompts only, none in an evaluation "
        "set), as the default judge is, instead of all labelled rows.")] = False,
) -> None:
    """Train a judge into a new folder; print its held-out agreement.

    The folder gets the judge, ``metrics.json`` and ``training_rows.jsonl`` (every labelled row
    with its split). Use it in a run with ``evaluate.judges: [{name: KIND, model: FOLDER}]``.
    """
    at_least("--max-prompts", max_prompts, 1)
    check_choice("--kind", kind, ("trained", "hidden"))
    if data_dir is not None:
        require_dir(data_dir, "data directory")
    if kind == "hidden":
        _train_hidden(out, data_dir, seed, max_prompts, force, features_cache)
        return
    from nlsr.evaluation.judges.training import default_dir, train_judge

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
    metrics = train_judge(data_dir, out, seed=seed, max_prompts=max_prompts, force=force or empty_dir, gated=gated)
    typer.echo(f"trained judge (text: {metrics['text']}, C={metrics['C']}) -> {out}")
    typer.echo(agreement_table(metrics["heldout"], "held-out agreement, trained judge:"))
    typer.echo(agreement_table(metrics["refusal_heldout"], "held-out agreement, refusal judge:"))
    if not is_default:
        typer.echo(f"use it in a config with evaluate.judges: [{{name: trained, model: {out}}}]")


def _train_hidden(out: Path | None, data_dir: Path | None, seed: int, max_prompts: int | None, force: bool,
                  features_cache: Path | None) -> None:
    from nlsr.evaluation.judges.hidden import default_dir, train_hidden_judge
    from nlsr.io import check_output_path

    if out is None:
        raise NlsrError(f"give --out FOLDER, a new folder for the judge; the default hidden judge ({default_dir()}) "
                        "is trained on first use and replaced only with --out DEFAULT_FOLDER --force")
    if out.resolve() == default_dir().resolve() and not force:
        raise NlsrError(f"--out '{out}' is the default hidden judge; pass --force to replace it, or choose "
                        "another folder")
    empty_dir = out.is_dir() and not any(out.iterdir())
    check_output_path(out, force or empty_dir)
    metrics = train_hidden_judge(data_dir, out, seed=seed, max_per_source=max_prompts, force=force or empty_dir,
                                 features_cache=features_cache)
    typer.echo(f"trained hidden judge (layer {metrics['layer']}, pooling {metrics['pooling']}, C={metrics['C']}, "
               "chosen on its validation split) -> " + str(out))
    typer.echo("rows removed by the gate: " + json.dumps(metrics["gate_removed"]))
    typer.echo(agreement_table(metrics["heldout"], "held-out agreement, hidden judge:"))
    typer.echo(agreement_table(metrics["refusal_heldout"], "held-out agreement, refusal judge:"))
    typer.echo(f"use it in a config with evaluate.judges: [{{name: hidden, model: {out}}}]")


@judge_app.command()
@_errors_to_exit
def validate(
    judge: Annotated[list[str], typer.Option(
        help="Judge name: refusal, refusal-v2, trained, hidden, beaverdam, llamaguard (repeat for several).")],
    model: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The judge's model: a trained judge folder, or a moderation model folder or hub id "
             "(one --judge only).")] = None,
    data_dir: DataDir = None,
    seed: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Split seed (default: the trained judge's own seed, else 0).")] = None,
    max_prompts: MaxPrompts = None,
    device: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Moderation models: cpu, cuda, cuda:1 ... (auto).")] = None,
    precision: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Moderation models: auto, float32 or bfloat16 (auto = bf16 where the hardware has it).")] = None,
    gold: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Hand-labelled generations (results/judge-gold/labels.jsonl): print each judge's Cohen's "
             "kappa, precision, recall and false-positive rate against their 'harmful' labels instead of "
             "the held-out labelled sources.")] = None,
) -> None:
    """Print judges' agreement with the held-out labelled responses (per source), or with gold labels."""
    for name in judge:
        JUDGES.check(name)
    if model is not None and len(judge) > 1:
        raise NlsrError("--model goes with one --judge; validate the other judges in another call")
    at_least("--max-prompts", max_prompts, 1)
    if data_dir is not None:
        require_dir(data_dir, "data directory")
    if gold is not None and not gold.is_file():
        raise NlsrError(f"gold labels '{gold}' do not exist")
    from nlsr.evaluation.judges import agreement, heldout_rows, make_judge

    built = {}
    for name in judge:
        params: dict[str, Any] = {}
        if model is not None:
            params["model"] = model
        if name in ("trained", "hidden") and model is None and data_dir is not None:
            params["data_dir"] = data_dir
        if name in ("beaverdam", "llamaguard"):
            params.update(device=device, precision=precision)
        built[name] = make_judge(name, **params)
    if gold is not None:
        from nlsr.evaluation.scoring import gold_agreement, read_gold

        rows = read_gold(gold)
        typer.echo(gold_table(gold_agreement(built, rows), f"agreement with the gold labels in {gold} "
                                                           f"({len(rows)} rows):"))
        return
    for name, one in built.items():
        split_seed = int(getattr(one, "meta", {}).get("seed", 0)) if seed is None else seed
        rows = heldout_rows(data_dir, seed=split_seed, max_prompts=max_prompts)
        per_source = {source: agreement(one, subset) for source, subset in rows.items() if subset}
        typer.echo(agreement_table(per_source, f"held-out agreement, {name} judge (split seed {split_seed}):"))


_GOLD_COLUMNS = ("n", "cohen_kappa", "precision", "recall", "false_positive_rate", "accuracy", "flagged_rate",
                 "label_rate")


def gold_table(per_judge: dict[str, dict[str, Any]], title: str = "") -> str:
    """One row per judge and question (``harmful``; the refusal matcher also ``refusal``)."""
    lines = [title] if title else []
    lines.append(f"{'judge':<12}{'labels':<9}" + "".join(f"{c:>20}" for c in _GOLD_COLUMNS))
    for name, per in per_judge.items():
        for question, m in per.items():
            cells = [f"{m[c]:>20d}" if c == "n" else f"{m[c]:>20.3f}" for c in _GOLD_COLUMNS]
            lines.append(f"{name:<12}{question:<9}" + "".join(cells))
    return "\n".join(lines)
