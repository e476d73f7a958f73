"""``python -m nlsr.cli``."""

from nlsr.cli.main import app

app(prog_name="nlsr")
