"""What the CLI modules share: the error policy, ``--debug``, and checks that import nothing heavy.

Every command checks its arguments and input paths with the helpers here *before* it imports
torch, transformers, peft or TRL, so that a typo is reported at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.errors import NlsrError

DEBUG_ENV = "NLSR_DEBUG"
_state = {"debug": False}
_DEBUG_HINT = "--debug (or NLSR_DEBUG=1) shows the traceback"


def set_debug(enabled: bool) -> None:
    """Set by the global ``--debug`` option: show tracebacks instead of one-line errors."""
    _state["debug"] = enabled


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_cli_control(err: BaseException) -> bool:
    """typer/click's own exits and usage errors, which must pass through untouched."""
    return isinstance(err, (typer.Exit, typer.Abort)) or type(err).__module__.startswith(("typer", "click"))


def describe_unexpected(err: Exception) -> tuple[str, int]:
    """One line and an exit status for an exception that is not an :class:`NlsrError`.

    Unreadable or unwritable files (``OSError``), malformed safetensors, JSON or text are input
    problems (status 2); anything else is reported as an internal error (status 1).
    """
    if isinstance(err, OSError):
        target = f"'{err.filename}'" if err.filename else "a file"
        reason = err.strerror or str(err)
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "choose a writable location (e.g. another --out) or fix the permissions"
        elif err.errno == errno.ENOSPC:
            fix = "free some disk space or write elsewhere"
        else:
            fix = "check the path and that the file is complete"
        return f"cannot use {target}: {reason}; {fix} ({_DEBUG_HINT})", 2
    kind = type(err).__name__
    if kind == "SafetensorError":
        return (f"a safetensors file could not be read ({err}); it is truncated or not a "
                f"safetensors file: regenerate or re-download it ({_DEBUG_HINT})"), 2
    if isinstance(err, UnicodeDecodeError):
        return f"a text file is not UTF-8 ({err}); save it as UTF-8 text ({_DEBUG_HINT})", 2
    if kind == "JSONDecodeError":
        return f"a JSON file is malformed ({err}); fix or regenerate it ({_DEBUG_HINT})", 2
    return f"unexpected {kind}: {err} (a bug or an unusual input; {_DEBUG_HINT})", 1


def errors_to_exit(fn):
    """Print :class:`NlsrError` as one clean line on stderr and exit with status 2.

    Other exceptions become one line too (see :func:`describe_unexpected`); with ``--debug`` or
    ``NLSR_DEBUG=1`` every exception propagates with its traceback.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NlsrError as err:
            if debug_enabled():
                raise
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:
            # the reader went away (`nlsr inspect DIR | head`): stop quietly, as `cat` does
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as err:
            if _is_cli_control(err) or debug_enabled():
                raise
            message, status = describe_unexpected(err)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(status) from None
    return wrapper


# --- checks that import nothing heavy -------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def require_adapter_dir(path: Path, option: str) -> Path:
    """``path`` if it looks like a PEFT adapter directory (its contents are checked on loading)."""
    if not path.exists():
        raise NlsrError(f"{option}: adapter directory '{path}' does not exist")
    if not path.is_dir():
        raise NlsrError(f"{option}: '{path}' is a file; give the adapter directory (holding "
                        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]})")
    if not (path / ADAPTER_CONFIG).is_file():
        raise NlsrError(f"{option}: '{path}' has no {ADAPTER_CONFIG}; an adapter is a PEFT directory "
                        f"with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise NlsrError(f"{option}: '{path}' has no {ADAPTER_WEIGHTS[0]}")
    return path


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file; else an error naming ``what`` it should be."""
    if not path.exists():
        raise NlsrError(f"{what} '{path}' does not exist{'; ' + hint if hint else ''}")
    if not path.is_file():
        raise NlsrError(f"{what} '{path}' is a folder, not a file{'; ' + hint if hint else ''}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise NlsrError(f"{what} '{path}' {state}")
    return path


def at_least(option: str, value: float | None, low: float) -> None:
    """``value`` (when given) must be ``>= low``."""
    if value is not None and not value >= low:
        raise NlsrError(f"{option} must be >= {low:g} (got {value:g})")


def in_unit_interval(option: str, value: float, closed_low: bool = False) -> None:
    """``value`` must lie in ``(0, 1]`` (``[0, 1]`` with ``closed_low``)."""
    ok = (0 <= value <= 1) if closed_low else (0 < value <= 1)
    if not ok:
        raise NlsrError(f"{option} must be in {'[' if closed_low else '('}0, 1] (got {value:g})")


def check_precision(precision: str | None) -> None:
    from nlsr.precision import PRECISIONS  # a light module: torch is imported only to resolve

    check_choice("--precision", precision.strip().lower() if precision else None,
                 (*PRECISIONS, "fp32", "bf16"))


def check_device(device: str | None) -> None:
    """A device that this machine has (``--device cuda`` without a GPU names the devices present)."""
    from nlsr.precision import check_device as check

    check(device, "--device")


@contextlib.contextmanager
def model_errors(base: str):
    """Loading errors of a model or tokenizer (malformed config.json, truncated weights, missing
    tokenizer files, an unknown hub id offline) as one line naming the model."""
    try:
        yield
    except NlsrError:
        raise
    except (OSError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())[:300].rstrip(".") or type(err).__name__
        raise NlsrError(f"cannot load the model '{base}': {detail}; give a complete transformers "
                        "model directory (config.json, tokenizer files and weights), a hub id, or "
                        "'smollm2'") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise NlsrError(f"cannot load the model '{base}': a weights file is not readable safetensors "
                        f"({err}); it is truncated, copy or download it again") from err


def check_choice(option: str, value: str | None, names) -> None:
    """Raise :class:`NlsrError` unless ``value`` (when given) is one of ``names``."""
    if value is not None and value not in names:
        raise NlsrError(f"unknown {option} '{value}'; use one of {', '.join(names)}")


Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]

AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept adapter_model.bin (pickle) files; only for trusted files.")]

Precision = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="auto, float32 or bfloat16. auto (default) = bfloat16 where the GPU or CPU computes it "
         "natively (AVX512-BF16/AMX), else float32.")]



def say(message: str) -> None:
    """Print one line of a command's output."""
    typer.echo(message)


# The options of a repair, shared by `nlsr realign` and `nlsr realign-batch` (one help text each).
Select = Annotated[str, typer.Option(help="Module selection: paper, reverse, threshold, all or random (`nlsr ls`).")]
Transplant = Annotated[str, typer.Option(
    help="block (default: rank 3r, the fine-tune with only its masked block swapped for the reference's, "
         "its cross terms kept; chosen on validation with q = 0.3, results/method-controls-quick), factor "
         "(rank r, the authors' code, the reference's entries swapped into each factor) or exact (rank 2r, "
         "the paper's formula: --transplant exact with masks of --keep 0.2 for the paper's setting).")]
Threshold = Annotated[Optional[float], typer.Option(  # noqa: UP045
    help="τ for --select threshold: repair modules with S < τ.")]
PBase = Annotated[float, typer.Option(help="P_L of the probabilistic rules.")]
Epsilon = Annotated[float, typer.Option(help="ε of the probabilistic rules.")]
Seed = Annotated[int, typer.Option(help="Seed of the probabilistic draw.")]
MinOriginCosine = Annotated[float, typer.Option(
    help="Refuse when the median cosine of A_e and A_t is below this (0 disables).")]
Granularity = Annotated[str, typer.Option(
    help="entry (the paper: the fine-tune continues the aligned adapter) or neuron (weight rows: a LoRA of "
         "any rank/initialisation, or model directories with --base).")]
AllowBaseMismatch = Annotated[bool, typer.Option(
    "--allow-base-mismatch", help="Accept adapters that name different base models.")]
AllowMaskMismatch = Annotated[bool, typer.Option(
    "--allow-mask-mismatch", help="Experts: accept masks recorded for another reference adapter, an older "
                                  "masks file without a record, or masks of extra modules.")]
