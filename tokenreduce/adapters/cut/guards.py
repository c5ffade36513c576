"""Call guards: the calls an attached model refuses, with a message that says why and what to do.

Each guard raises :class:`~tokenreduce.core.errors.UnsupportedCallError` (or
:class:`~tokenreduce.core.errors.PlanError` at attach time) and otherwise returns nothing.
The refused calls are listed in ``docs/cut.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from tokenreduce.core.errors import PlanError, UnsupportedCallError

from ..masks import SUPPORTED_ATTENTION

__all__ = [
    "check_attention",
    "check_call",
    "check_decode",
    "check_decode_mask",
    "check_left_padded",
    "check_prefill",
    "right_padding",
]


def check_attention(impl: str) -> None:
    """At attach time: the language model's attention implementation is one the cut supports."""
    if impl not in SUPPORTED_ATTENTION:
        raise PlanError(
            f"attention implementation {impl!r} is not supported by the cut; "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )


def check_call(kwargs: dict, cache: Any, adapter_check: Callable[[dict], str | None] | None = None) -> None:
    """Every top-level forward: no per-layer outputs, no labels, a ``DynamicCache`` (or none), and
    whatever the adapter refuses (``adapter_check(kwargs)`` returns a message)."""
    for bad in ("output_hidden_states", "output_attentions"):
        if kwargs.get(bad):
            raise UnsupportedCallError(
                f"{bad}=True is not supported while tokenreduce is attached: layers after a cut see "
                "fewer tokens, so per-layer outputs have different lengths; detach first, or read "
                "att.trace for what was kept"
            )
    if kwargs.get("labels") is not None:
        raise UnsupportedCallError(
            "forward(labels=...) is not supported while tokenreduce is attached: the logits come back "
            "for the reduced sequence only; compute the loss from out.logits with att.trace.final_index"
        )
    if cache is not None and type(cache).__name__ not in ("DynamicCache",):
        raise UnsupportedCallError(
            f"{type(cache).__name__} is not supported while attached (layers after a cut hold fewer "
            "entries); use the default DynamicCache (no cache_implementation='static', no compile)"
        )
    if adapter_check is not None:
        problem = adapter_check(kwargs)
        if problem:
            raise UnsupportedCallError(problem)


def check_prefill(input_ids: Tensor | None) -> None:
    """A prefill passes ``input_ids`` (the visual tokens are located from them)."""
    if input_ids is None:
        raise UnsupportedCallError(
            "tokenreduce locates visual tokens from input_ids; this call passed inputs_embeds only"
        )


def check_decode(prefilled: bool, input_ids: Tensor | None, is_media_token: Callable[[Tensor], Tensor]) -> None:
    """A decode step follows a prefill under this attachment and brings no new image tokens."""
    if not prefilled:
        raise UnsupportedCallError(
            "this KV cache was not prefilled under the current attachment (cache reuse across "
            "attachments or turns is not supported); prefill again with an empty cache"
        )
    if input_ids is not None and bool(is_media_token(input_ids).any()):
        raise UnsupportedCallError(
            "image tokens in a decode step (cache reuse with new images) are not supported; run a fresh prefill"
        )


def check_decode_mask(mask2d: Tensor, total: int, orig_len: int) -> None:
    """A decode step's 2-D mask covers the prefill plus every token generated since."""
    if mask2d.shape[1] != total:
        raise UnsupportedCallError(
            f"decode step with an attention_mask of length {mask2d.shape[1]}, expected {total} "
            f"(prefill of {orig_len} tokens plus {total - orig_len} generated); "
            "steps must follow the prefill one after another"
        )


def right_padding(mask2d: Tensor | None) -> tuple[int, int] | None:
    """``(sample, position)`` of the first padding after a token in a 2-D attention mask (right
    padding, or a hole); None when every row is left-padded (or there is no 2-D mask)."""
    if mask2d is None or mask2d.dim() != 2:
        return None
    valid = mask2d.bool()
    late = valid.long().cummax(-1).values.bool() & ~valid  # padding after the row's first token
    if not bool(late.any()):
        return None
    sample = int(late.any(-1).nonzero()[0])
    return sample, int(late[sample].nonzero()[0])


def check_left_padded(where: tuple[int, int] | None, call: str) -> None:
    """A prefill that decode steps continue (``call``: what continues it) is left-padded
    (``where``: from :func:`right_padding`)."""
    if where is None:
        return
    sample, position = where
    raise UnsupportedCallError(
        f"{call} with right padding is not supported while tokenreduce is attached: the attention_mask of "
        f"sample {sample} has padding at position {position}, after its tokens (transformers itself generates "
        "wrong tokens after right padding); pad on the left: processor.tokenizer.padding_side='left' (a plain "
        "forward without a cache accepts right padding)"
    )
