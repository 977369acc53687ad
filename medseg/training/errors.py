"""The error training raises when it cannot start as asked; the CLI shows it as one line."""

from __future__ import annotations


class TrainingError(ValueError):
    """Training cannot start as asked (a user error)."""
