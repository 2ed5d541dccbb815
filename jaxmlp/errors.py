"""Exception types. Every message is one line that names the problem and the fix.

The CLI prints `jaxmlp: error: <message>` for any `JaxmlpError` and exits with code 2.
"""

from __future__ import annotations


class JaxmlpError(Exception):
    """Base class of every error jaxmlp raises on purpose."""


class DataError(JaxmlpError, ValueError):
    """The names file cannot be used (missing, empty, not UTF-8, bad characters, ...)."""


class ConfigError(JaxmlpError, ValueError):
    """A hyperparameter or option is out of range or inconsistent."""


class RunError(JaxmlpError):
    """A run directory or checkpoint is missing, corrupted or does not fit."""


class DivergenceError(JaxmlpError):
    """Training produced a non-finite loss (or parameters); `step` is the first bad step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step
