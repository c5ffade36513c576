"""The three interfaces every strategy and adapter implements (structural ``Protocol``s).

A component is a class with a pydantic ``Settings`` model (``extra="forbid"``) and a constructor
taking one instance of it.  The registry binds a name to the class; plans refer to the name.

* :class:`Scorer` turns a :class:`~tokenreduce.core.types.TokenView` into one float per visual
  candidate (higher = more worth keeping).
* :class:`Selector` turns scores (or nothing) and a per-sample keep count into a
  :class:`~tokenreduce.core.types.Selection`.
* :class:`ModelAdapter` attaches a compiled plan to a model and detaches it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel
from torch import Tensor

from .types import Need, Selection, TokenView

if TYPE_CHECKING:  # pragma: no cover
    from .plan import CompiledPlan


@runtime_checkable
class Scorer(Protocol):
    """Scores visual candidates.

    ``score`` returns ``[B, N]`` float32 scores, higher = keep.  Values at invalid candidates
    (``view.visual_valid`` False) are ignored by selectors.
    """

    Settings: ClassVar[type[BaseModel]]
    needs: ClassVar[Need]

    def __init__(self, settings: Any) -> None: ...

    def score(self, view: TokenView) -> Tensor: ...


@runtime_checkable
class Selector(Protocol):
    """Chooses which visual candidates survive a cut.

    ``select(view, scores, keep)``: ``scores`` is ``[B, N]`` float32 or None (when the selector
    declares ``needs_scores = False`` and the stage has no scorer); ``keep`` is ``[B]`` long with
    ``1 <= keep[b] <= n_visual[b]`` (or 0 for a sample without visual tokens).  Returns exactly
    ``keep[b]`` ascending candidate indices per sample.
    """

    Settings: ClassVar[type[BaseModel]]
    needs: ClassVar[Need]
    needs_scores: ClassVar[bool]

    def __init__(self, settings: Any) -> None: ...

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection: ...


@runtime_checkable
class Attachment(Protocol):
    """A live attachment of a plan to a model; a context manager.

    ``trace`` records the last prefill.  ``detach()`` (also called on ``__exit__``) removes every
    hook, after which the model's outputs are bit-identical to before.
    """

    trace: Any

    def detach(self) -> None: ...

    def __enter__(self) -> "Attachment": ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class ModelAdapter(Protocol):
    """Everything architecture-specific: where visual tokens are, positions, masks, KV cache,
    and how to compute signals.  Selected by ``model.config.model_type``."""

    model_types: ClassVar[tuple[str, ...]]
    provides: ClassVar[Need]

    @classmethod
    def num_layers(cls, model: Any) -> int:
        """Number of decoder layers of the language model."""
        ...

    @classmethod
    def attach(cls, model: Any, plan: "CompiledPlan") -> Attachment: ...
