"""The interfaces every strategy and adapter implements.

* :class:`Scorer` turns a :class:`~tokenreduce.core.types.TokenView` into one float per visual
  candidate (higher = more worth keeping); :class:`Selector` turns scores (or nothing) and a
  per-sample keep count into a :class:`~tokenreduce.core.types.Selection`.  Both are base
  classes declared in :mod:`tokenreduce.core.strategy` (settings as fields, hooks with
  defaults) and re-exported here; the registry binds a name to each class.
* :class:`ModelAdapter` attaches a compiled plan to a model and detaches it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel
from torch import Tensor

from .strategy import Scorer as Scorer  # re-exported: the strategy contract
from .strategy import Selector as Selector
from .types import Need

if TYPE_CHECKING:  # pragma: no cover
    from .plan import CompiledPlan


@runtime_checkable
class Attachment(Protocol):
    """A live attachment of a plan to a model; a context manager.

    ``trace`` records the last prefill.  ``detach()`` (also called on ``__exit__``) removes every
    hook, after which the model's outputs are bit-identical to before; it is idempotent.
    ``candidate_mask`` (``[B, S]`` bool), ``visual_grid()`` (``[B, S, 3]``) and
    ``visual_layout()`` describe the last prefill's visual candidates.  The built-in
    implementation: ``tokenreduce.adapters.cut.CutAttachment`` (``docs/cut.md``).
    """

    trace: Any

    @property
    def attached(self) -> bool: ...

    @property
    def candidate_mask(self) -> Tensor | None: ...

    def visual_grid(self) -> Tensor: ...

    def visual_layout(self) -> tuple[Tensor, Tensor]: ...

    def detach(self) -> None: ...

    def __enter__(self) -> Attachment: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class ModelAdapter(Protocol):
    """What the registry, plan building and :func:`tokenreduce.apply` ask of an adapter *class*
    (selected by ``model.config.model_type``); ``isinstance(cls, ModelAdapter)`` checks it.

    ``provides`` lists the signals it supplies, ``missing_reasons`` why a lacking one is missing,
    ``Settings`` its options (``Plan.adapter``; None: none).  The built-in base class is
    ``tokenreduce.adapters.cut.DecoderAdapter``; see ``docs/writing-an-adapter.md``.
    """

    model_types: ClassVar[tuple[str, ...]]
    provides: ClassVar[Need]
    missing_reasons: ClassVar[dict[Need, str]]
    Settings: ClassVar[type[BaseModel] | None]

    @classmethod
    def num_layers(cls, model: Any) -> int:
        """Number of decoder layers of the language model."""
        ...

    @classmethod
    def attach(cls, model: Any, plan: CompiledPlan) -> Attachment:
        """Attach a compiled plan; returns the attachment."""
        ...
