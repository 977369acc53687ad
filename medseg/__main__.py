"""``python -m medseg`` runs the command-line interface."""

from medseg.cli import app

app()
