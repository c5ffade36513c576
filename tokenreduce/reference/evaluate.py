"""Accuracy of a VLM on easy-VQA or the generated scenes by greedy ``generate()``: exact match of the
answer word (the accuracy on the reference models' cards, checked by CI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, ProcessorMixin

from tokenreduce.reference import data

__all__ = ["EvalResult", "evaluate_generate", "arch_of"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of greedy answers.

    Attributes:
        split: ``"train"`` or ``"test"``.
        indices: the question indices evaluated (into the split), in evaluation order.
        predictions: the decoded answer of each question (normalised).
        correct: whether each prediction equals the answer.
    """

    split: str
    indices: tuple[int, ...]
    predictions: tuple[str, ...]
    correct: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, self.n)


def arch_of(model: PreTrainedModel) -> str:
    """The architecture of ``model`` (its ``config.model_type``), checked to be registered.

    Raises:
        UnsupportedModelError: no architecture is registered for that model type.
    """
    from tokenreduce.core.registry import get_registry

    model_type = model.config.model_type
    get_registry().spec_for(model_type, what="easy-VQA evaluation")
    return model_type


@torch.no_grad()
def evaluate_generate(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    split: str = "test",
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 3,
    progress: Callable[[int], None] | None = None,
    task: Literal["easy_vqa", "scenes"] = "easy_vqa",
) -> EvalResult:
    """Greedy-decode answers to the questions of a reference task and score them by exact match.

    Args:
        model: a model of a registered architecture (any size; put it in eval mode first).
        processor: its processor (left padding is forced for the call).
        split: ``"train"`` or ``"test"``.
        indices: question indices into the split (default: all of them).
        batch_size: questions per ``generate()`` call (B); padding is on the left.
        max_new_tokens: tokens to generate; the reference models answer with ``"<word></s>"``.
        progress: optional callback, called with the number of questions done after each batch.
        task: ``"easy_vqa"`` (:mod:`tokenreduce.reference.data`) or ``"scenes"``
            (:mod:`tokenreduce.reference.scenes`); the prompt is the same for both.

    Returns:
        an :class:`EvalResult`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if task not in ("easy_vqa", "scenes"):
        raise ValueError(f"task must be 'easy_vqa' or 'scenes', got {task!r}")
    arch = arch_of(model)
    if task == "scenes":
        from tokenreduce.reference import scenes

        split_data: data.EasyVQASplit | scenes.ScenesSplit = scenes.load_split(split)  # type: ignore[arg-type]
    else:
        split_data = data.load_split(split)
    index = list(range(len(split_data))) if indices is None else [int(i) for i in indices]
    for i in index:
        if not 0 <= i < len(split_data):
            raise IndexError(f"question index {i} out of range for the {split} split ({len(split_data)} questions)")
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    predictions: list[str] = []
    correct: list[bool] = []
    try:
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            images = [split_data.image(split_data.image_ids[i]) for i in chunk]
            prompts = [data.prompt(split_data.questions[i], arch) for i in chunk]
            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to(device)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]  # [B, <= max_new_tokens]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                pred = data.normalize_answer(text)
                predictions.append(pred)
                correct.append(pred == data.normalize_answer(split_data.answers[i]))
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = old_side
    return EvalResult(split=split, indices=tuple(index), predictions=tuple(predictions), correct=tuple(correct))
