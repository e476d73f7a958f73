"""The command line: thin typer commands over the library (``nlsr --help``)."""

from nlsr.cli.main import app

__all__ = ["app"]
