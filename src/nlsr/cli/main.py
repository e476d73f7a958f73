"""The ``nlsr`` command line: thin typer commands over the library, one module per group.

:mod:`nlsr.cli.repair` (extrapolate, identify, realign, safelora, inspect), :mod:`nlsr.cli.evaluate`,
:mod:`nlsr.cli.experiment` (run, validate, export, compare, ls) and :mod:`nlsr.cli.judge`. Commands check
their arguments and input paths first and import torch, transformers, peft and TRL only after that
(inside the command), so that `nlsr --help` and a typo answer at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nlsr.cli.batch import realign_batch
from nlsr.cli.common import errors_to_exit, set_debug
from nlsr.cli.evaluate import evaluate
from nlsr.cli.experiment import compare, export, list_registries, run, validate
from nlsr.cli.judge import judge_app
from nlsr.cli.repair import extrapolate, identify, inspect, realign, safelora

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neuron-Level Safety Realignment (NLSR) of LoRA-fine-tuned LLMs.")


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an error instead of one line (or set NLSR_DEBUG=1).")]
          = False) -> None:
    set_debug(debug)


for command in (extrapolate, identify, realign, safelora, inspect):
    app.command()(command)
app.command("realign-batch")(realign_batch)
app.command(name="evaluate")(errors_to_exit(evaluate))
for command in (run, validate, export, compare):
    app.command()(command)
app.command(name="ls")(list_registries)
app.add_typer(judge_app, name="judge", help="Train and validate harmfulness judges.")


if __name__ == "__main__":
    app()
