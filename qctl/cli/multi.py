"""``qctl multi``."""
from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True})
def multi() -> None:
    """(under construction)"""
    raise click.UsageError("not available yet")
