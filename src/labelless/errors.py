"""Error types raised by labelless.

Every error that bad input can cause is a :class:`LabellessError` (a ``ValueError``),
whose message is one line saying what is wrong and what to do about it. The CLI prints
that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

__all__ = ["LabellessError", "PlanError", "FileFormatError", "ModelError", "DataError"]


class LabellessError(ValueError):
    """Bad input or a failed check: the message says what is wrong and what to do."""


class PlanError(LabellessError):
    """A plan (which layer gets how many centroids) is malformed or selects nothing."""


class FileFormatError(LabellessError):
    """A ``.lless`` file is truncated, corrupted, of an unknown version or lies about itself."""


class ModelError(LabellessError):
    """A model name, checkpoint or architecture does not fit what was asked."""


class DataError(LabellessError):
    """A data spec names nothing, or the data it names cannot be read."""
