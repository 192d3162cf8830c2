"""The library's one exception base. Every error a user can cause derives from `EttinError`
and also from the built-in type it has always been (`ValueError`, `RuntimeError`), so both
`except EttinError` and the old `except ValueError` catch it. The CLI turns any `EttinError`
into one line on stderr and exit status 2."""

from __future__ import annotations


class EttinError(Exception):
    """Base of every ettin-jax error that a user's input or environment can cause."""
