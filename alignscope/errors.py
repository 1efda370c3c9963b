"""Errors that reach the user as one line.

Every error alignscope raises on purpose derives from :class:`AlignscopeError`
and carries a message that says what was wrong and what to do. The command
line prints that message on one line and exits with :attr:`exit_code`:
2 for usage errors (bad arguments), 1 for runtime failures.
"""
from __future__ import annotations


class AlignscopeError(Exception):
    """A failure whose message is meant for the user, without a traceback."""

    exit_code = 1


class UsageError(AlignscopeError, ValueError):
    """The caller asked for something that cannot be done (exit code 2)."""

    exit_code = 2


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (a number where a spec was expected, a float batch size): exit code 2."""


class ModelError(UsageError):
    """Unknown model, unavailable weights or a checkpoint that does not fit."""


class LayerError(UsageError):
    """A requested layer does not exist or has no spatial output."""


class TransformSpecError(UsageError):
    """A ``--transform`` spec that does not parse."""


class ImageError(UsageError):
    """No readable images where images were asked for."""


class ReportExistsError(UsageError):
    """An earlier report would be overwritten without ``force``."""


class LimitsBroken(AlignscopeError):
    """Rows of a report break the limits of a gate (``alignscope check``, ``--fail-above``): exit code 1."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut to ``limit`` characters."""
    return ((str(exc).splitlines() or [""])[0] or type(exc).__name__)[:limit]
