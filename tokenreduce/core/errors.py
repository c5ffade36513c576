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
    """A plugin failed to load (its entry point did not import, its hook is misspelled or raised);
    the message names the plugin and its distribution."""


class RegistrationError(TokenReduceError, TypeError, ValueError):
    """A plugin registered a component that breaks the contract: a name that is not lower_snake, no
    pydantic ``Settings``, a scorer without ``score()`` or a selector without ``select()``; the
    message names the component, its class, the plugin it came from and what is missing."""


class ComponentOutputError(TokenReduceError, RuntimeError):
    """A scorer or selector returned something outside the contract during a forward pass (wrong
    shape or dtype, non-finite scores, a selection of the wrong size); the message names the stage
    and the component."""


class UnsupportedModelError(TokenReduceError, TypeError):
    """No registered adapter handles the model's ``config.model_type``."""


class UnsupportedCallError(TokenReduceError, ValueError):
    """A forward/generate argument that the attached model cannot honour (e.g. ``labels``)."""


class AlreadyAttachedError(TokenReduceError, RuntimeError):
    """A model already has an attachment: one attachment per model at a time (the message names
    the attachment present and the thread that made it)."""
