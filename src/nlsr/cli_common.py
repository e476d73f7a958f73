"""What the CLI modules share."""

from __future__ import annotations

import functools

import typer


def errors_to_exit(fn):
    """Print :class:`NlsrError` as one clean line on stderr and exit with status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nlsr.errors import NlsrError

        try:
            return fn(*args, **kwargs)
        except NlsrError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    return wrapper
