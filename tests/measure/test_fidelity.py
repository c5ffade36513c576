"""Fidelity metrics against hand-computed values."""

import math

import pytest
import torch

from tokenreduce.measure.fidelity import (
    accuracy,
    exact_match,
    first_token_agreement,
    first_token_kl,
    normalize_answer,
    retention,
    trim_at_eos,
)


def test_first_token_agreement_on_tensors_and_lists():
    vanilla = torch.tensor([[5, 6, 3], [7, 8, 3], [9, 3, 1], [4, 4, 4]])
    reduced = torch.tensor([[5, 9, 9], [8, 8, 3], [9, 3, 1], [4, 1, 1]])
    assert first_token_agreement(vanilla, reduced) == 0.75  # sample 1 differs at the first token
    assert first_token_agreement([5, 7], [5, 8]) == 0.5  # 1-D inputs are [B] first tokens
    assert first_token_agreement(torch.tensor([5, 7]), torch.tensor([5, 8])) == 0.5
    assert first_token_agreement([[], [1]], [[], [2]]) == 0.5  # two empty answers agree


def test_exact_match_trims_at_eos_and_padding():
    vanilla = trim_at_eos(torch.tensor([[5, 6, 3, 1], [7, 8, 9, 9]]), eos_token_id=3, pad_token_id=1)
    reduced = trim_at_eos(torch.tensor([[5, 6, 3, 7], [7, 8, 9, 1]]), eos_token_id=[3, 2], pad_token_id=1)
    assert vanilla == [[5, 6], [7, 8, 9, 9]] and reduced == [[5, 6], [7, 8, 9]]
    assert exact_match(vanilla, reduced) == 0.5
    assert exact_match(["red", "a circle"], ["red", "A circle"]) == 0.5  # strings verbatim


def test_first_token_kl_hand_computed():
    vanilla = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    reduced = torch.tensor(
        [[math.log(3.0), 0.0], [11.0, 12.0]], dtype=torch.float64
    )  # row 2: same distribution (shifted logits)
    # row 1: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    per = first_token_kl(vanilla, reduced, reduction="none")
    assert per[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert per[1].item() == pytest.approx(0.0, abs=1e-12)
    assert first_token_kl(vanilla, reduced) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-12)
    # not symmetric: KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert first_token_kl(reduced[:1], vanilla[:1]) == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12
    )


def test_first_token_kl_is_stable_for_large_logits_and_half_dtype():
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert first_token_kl(big, big) == 0.0
    v = torch.randn(3, 50).to(torch.bfloat16)
    assert first_token_kl(v, v) == 0.0
    assert first_token_kl(v, torch.zeros(3, 50, dtype=torch.bfloat16)) > 0


def test_normalisation_and_accuracy():
    assert normalize_answer("  The  Circle. ") == "circle"
    assert normalize_answer("dark-blue") == "dark blue"
    assert normalize_answer("An apple") == "apple"
    answers = ["Red.", "it is red", "Yes", "triangle"]
    gold = ["red", "red", ["yes", "yeah"], "circle"]
    assert accuracy(answers, gold) == 0.5


def test_retention_and_errors():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.3, 0.0) is None
    with pytest.raises(ValueError, match="2 vanilla and 1 reduced"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        accuracy([], [])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        first_token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
