"""``nlsr evaluate``: check a model, an adapter or a full fine-tune on your own prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.cli.common import Force, Precision, at_least, check_choice, check_device, check_precision


def evaluate(
    prompts: Annotated[Path, typer.Option(
        help="Your prompt file: .txt (one prompt per line), .jsonl (a 'prompt' field) or .csv (a 'prompt' column).")],
    out: Annotated[Path, typer.Option(help="Output folder: generations.jsonl and summary.json.")],
    base: Annotated[str, typer.Option(help="Base model: 'smollm2' (embedded), a folder or a hub id.")] = "smollm2",
    adapter: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="A PEFT adapter folder to evaluate on --base.")] = None,
    model: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="A full model folder (config.json + safetensors) to evaluate instead of --base.")] = None,
    prompt_field: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The JSONL field / CSV column holding the prompt (default: prompt).")] = None,
    judge: Annotated[str, typer.Option(
        help="Harm judge (see `nlsr ls`); default: the one that agrees best with the hand labels.")] = "trained",
    template: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="alpaca or chat (default: the template the adapter records, else the model's own).")] = None,
    xstest: Annotated[int, typer.Option(
        help="Also measure over-refusal on this many XSTest safe prompts (0: skip; 250: all).")] = 0,
    task: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Also measure fine-tuning accuracy on a registered task: sst2, ag_news or gsm8k.")] = None,
    task_n: Annotated[int, typer.Option(help="Task evaluation rows (the first N).")] = 200,
    limit: Annotated[Optional[int], typer.Option(help="Use the first N prompts only.")] = None,  # noqa: UP045
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per answer (greedy).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
    data_dir: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Offline data folder for --xstest, --task and the trained judge (default: NLSR_DATA_DIR / "
             "shared/data).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (auto).")] = None,  # noqa: UP045
    precision: Precision = None,
    force: Force = False,
) -> None:
    """Harmful score and refusal rate (95% intervals) on your prompts; optionally over-refusal and task accuracy.

    Resumes after a kill: rerun the same command."""
    from nlsr.data.tasks import TASKS
    from nlsr.data.templates import TEMPLATES
    from nlsr.evaluation.evaluate import EvaluationSettings, Subject, cache_folder, check_subject, summary_table
    from nlsr.evaluation.prompts import read_prompts
    from nlsr.io import check_output_path

    for option, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size),
                          ("--task-n", task_n), ("--limit", limit)):
        at_least(option, value, 1)
    at_least("--xstest", xstest, 0)
    check_choice("--template", template, TEMPLATES)
    check_choice("--task", task, tuple(TASKS))
    check_precision(precision)
    _check_judge(judge)
    subject = Subject(base=base, adapter=adapter, model=model)
    check_subject(subject)
    texts = read_prompts(prompts, prompt_field, limit)
    check_output_path(out, force)
    if xstest or task or data_dir is not None:
        from nlsr.paths import data_dir as resolve_data_dir
        from nlsr.paths import describe_data_dir

        data_dir = str(resolve_data_dir(data_dir))
        typer.echo(f"[data] {describe_data_dir(data_dir)}")
    if cache_folder(out).is_dir():
        typer.echo(f"resuming: finished batches are in {cache_folder(out)}")
    check_device(device)
    from nlsr.evaluation.evaluate import evaluate as run

    settings = EvaluationSettings(judge=judge, template=template, prompt_field=prompt_field, limit=limit,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, xstest_n=xstest,
                                  task=task, task_n=task_n, device=device, precision=precision, data_dir=data_dir)
    summary = run(subject, texts, out, settings, prompt_file=prompts, force=force, log=typer.echo)
    typer.echo(summary_table(summary))
    typer.echo(f"-> {out}")


def _check_judge(name: str) -> None:
    from nlsr.evaluation.judges import JUDGES

    JUDGES.check(name)
