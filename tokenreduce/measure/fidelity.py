"""Fidelity of a reduced model against the unreduced (vanilla) model on the same inputs.

Pure functions on tensors and lists; no model is touched here (``tokenreduce.measure.tasks``
runs the models and calls these).

* :func:`first_token_agreement` — share of samples whose first generated token is the same.
* :func:`exact_match` — share of samples whose whole answer is the same (token ids up to the
  first end-of-sequence token, or strings compared verbatim).
* :func:`first_token_kl` — mean KL(vanilla || reduced) of the first-token distributions, in nats.
* :func:`accuracy` — share of answers equal to the gold answer after :func:`normalize_answer`.

Every function refuses inputs of different lengths and empty inputs with a clear error instead
of returning a silently wrong number.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "normalize_answer",
    "first_tokens",
    "trim_at_eos",
    "first_token_agreement",
    "exact_match",
    "first_token_kl",
    "accuracy",
    "retention",
]

TokenRows = Tensor | Sequence[Sequence[int]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """The normalisation :func:`accuracy` compares under (VQA-style, simplified).

    Lower-case; punctuation becomes a space; the articles ``a``, ``an``, ``the`` are removed;
    runs of whitespace collapse to one space; leading/trailing space is stripped.
    ``"The  Circle."`` -> ``"circle"``; ``"dark-blue"`` -> ``"dark blue"``.
    """
    text = str(text).lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_pair(name: str, a_len: int, b_len: int) -> None:
    if a_len != b_len:
        raise ValueError(f"{name}: got {a_len} vanilla and {b_len} reduced samples; they must be the same inputs")
    if a_len == 0:
        raise ValueError(f"{name}: no samples")


def _rows(tokens: TokenRows) -> list[list[int]]:
    if isinstance(tokens, Tensor):
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 2:
            raise ValueError(f"token ids must be [B, T] (or [B]); got shape {tuple(tokens.shape)}")
        return [[int(t) for t in row] for row in tokens.tolist()]
    return [[int(row)] if isinstance(row, int) else [int(t) for t in row] for row in tokens]


def trim_at_eos(
    tokens: TokenRows, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None
) -> list[list[int]]:
    """Generated ids per sample, cut before the first end-of-sequence token.

    Args:
        tokens: ``[B, T]`` generated ids (without the prompt), a tensor or lists.
        eos_token_id: one id or several; ``None`` keeps every token.
        pad_token_id: trailing padding to drop (``generate()`` pads finished rows with it).

    Returns:
        B lists of ints.
    """
    eos = (
        set()
        if eos_token_id is None
        else ({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    )
    out = []
    for row in _rows(tokens):
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        row = row[:cut]
        if pad_token_id is not None:
            while row and row[-1] == pad_token_id:
                row.pop()
        out.append(row)
    return out


def first_tokens(tokens: TokenRows) -> list[int | None]:
    """The first generated id of each sample (``None`` for an empty answer)."""
    return [row[0] if row else None for row in _rows(tokens)]


def first_token_agreement(vanilla: TokenRows, reduced: TokenRows) -> float:
    """Share of samples whose first generated token id is the same.

    Args:
        vanilla, reduced: ``[B]`` first ids or ``[B, T]`` generated ids (only column 0 is read),
            tensors or (nested) lists.  Two empty answers agree.

    Returns:
        a float in [0, 1].
    """
    a, b = first_tokens(vanilla), first_tokens(reduced)
    _check_pair("first_token_agreement", len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / len(a)


def exact_match(vanilla: Sequence[str] | TokenRows, reduced: Sequence[str] | TokenRows) -> float:
    """Share of samples whose whole answer is identical.

    Strings are compared verbatim (no normalisation: this measures fidelity to the vanilla
    output, not correctness); token rows are compared id by id, so trim them first with
    :func:`trim_at_eos` (different padding after the end-of-sequence token is not a
    difference).
    """
    a = list(vanilla) if not isinstance(vanilla, Tensor) else _rows(vanilla)
    b = list(reduced) if not isinstance(reduced, Tensor) else _rows(reduced)
    _check_pair("exact_match", len(a), len(b))
    norm = lambda x: x if isinstance(x, str) else [int(t) for t in x]  # noqa: E731
    return sum(norm(x) == norm(y) for x, y in zip(a, b)) / len(a)


def first_token_kl(vanilla_logits: Tensor, reduced_logits: Tensor, reduction: str = "mean") -> Tensor | float:
    """KL(p_vanilla || p_reduced) of the first-token distributions, in nats.

    ``KL = sum_v p(v) (log p(v) - log q(v))`` with ``p = softmax(vanilla_logits)`` and
    ``q = softmax(reduced_logits)``, computed in float64 from ``log_softmax`` (stable for large
    logits; a token with ``p = 0`` contributes 0).

    Args:
        vanilla_logits, reduced_logits: ``[B, V]`` raw logits of the first generated position
            (``generate(output_logits=True).logits[0]``), any float dtype.
        reduction: ``"mean"`` (a float, averaged over the B samples) or ``"none"`` (``[B]``
            float64 tensor).
    """
    if vanilla_logits.shape != reduced_logits.shape or vanilla_logits.dim() != 2:
        raise ValueError(
            f"first_token_kl: logits must both be [B, V]; got {tuple(vanilla_logits.shape)} and {tuple(reduced_logits.shape)}"
        )
    _check_pair("first_token_kl", vanilla_logits.shape[0], reduced_logits.shape[0])
    logp = torch.log_softmax(vanilla_logits.detach().to(torch.float64), dim=-1)
    logq = torch.log_softmax(reduced_logits.detach().to(torch.float64), dim=-1)
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1).clamp(min=0.0)  # [B]
    if reduction == "none":
        return kl
    if reduction != "mean":
        raise ValueError(f"first_token_kl: reduction must be 'mean' or 'none', got {reduction!r}")
    return float(kl.mean())


def accuracy(answers: Sequence[str], gold: Sequence[str | Sequence[str]]) -> float:
    """Share of answers equal to their gold answer after :func:`normalize_answer`.

    Args:
        answers: B generated answers (decoded text).
        gold: B gold answers; an entry may be a list of acceptable answers (any one counts).

    An answer is correct when its normalised text equals a normalised gold answer exactly
    (``"Red."`` matches ``"red"``; ``"it is red"`` does not).
    """
    _check_pair("accuracy", len(answers), len(gold))
    correct = 0
    for ans, ref in zip(answers, gold):
        refs = [ref] if isinstance(ref, str) else list(ref)
        correct += normalize_answer(ans) in {normalize_answer(r) for r in refs}
    return correct / len(answers)


def retention(score: float, vanilla_score: float) -> float | None:
    """``score / vanilla_score`` (the share of the vanilla model's accuracy a plan keeps), or
    ``None`` when the vanilla score is 0 (undefined)."""
    return None if vanilla_score == 0 else score / vanilla_score
