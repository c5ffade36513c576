"""The cut engine: how visual tokens leave a Llama-family decoder stack, through forward
pre-hooks only.

* :mod:`.adapter`: :class:`DecoderAdapter`, the base class of adapters (one instance per model);
* :mod:`.attachment`: :class:`CutAttachment`, the prefill/decode state machine and the trace;
* :mod:`.hooks`: hook lifecycle; :mod:`.guards`: refused calls;
* :mod:`.slots`: slot bookkeeping (pure functions); :mod:`.layer_kwargs`: mask and RoPE rewriting.

See ``docs/cut.md`` and ``docs/writing-an-adapter.md``.
"""

from .adapter import DecoderAdapter
from .attachment import VISION_NEEDS, AlreadyAttachedError, CutAttachment, StageState, attachment_of
from .hooks import Hooks
from .slots import Slots

__all__ = [
    "VISION_NEEDS",
    "AlreadyAttachedError",
    "CutAttachment",
    "DecoderAdapter",
    "Hooks",
    "Slots",
    "StageState",
    "attachment_of",
]
