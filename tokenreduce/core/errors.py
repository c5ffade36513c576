"""Exceptions raised by tokenreduce.

Every error says what was wrong, where (a field path such as ``stages.1.layer``), and what is
allowed.  They are raised before a model is touched, or, when raised during a forward pass, by a
pre-hook that runs before any computation of the model, so a model is never left modified.
"""

from __future__ import annotations


class TokenReduceError(Exception):
    """Base class of every error raised by tokenreduce."""


class PlanError(TokenReduceError, ValueError):
    """A plan (or one of its components' settings) is invalid, or does not fit the model."""


class UnknownComponentError(TokenReduceError, KeyError):
    """A registry name is unknown; the message lists the known names of that kind."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(TokenReduceError):
    """Two plugins registered the same (kind, name); the message names both origins."""


class PluginLoadError(TokenReduceError, ImportError):
    """A plugin entry point failed to import; the message names its distribution."""


class UnsupportedModelError(TokenReduceError, TypeError):
    """No registered adapter handles the model's ``config.model_type``."""


class UnsupportedCallError(TokenReduceError, ValueError):
    """A forward/generate argument that the attached model cannot honour (e.g. ``labels``)."""
