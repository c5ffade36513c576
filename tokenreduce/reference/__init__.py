"""Reference VLMs trained by the project on easy-VQA and shipped inside the package.

Model weights cannot be downloaded in the project's environments, and random-weight models say
nothing about which visual tokens matter. So the project trains small VLMs from scratch on the
easy-VQA data set (the ``easy-vqa`` package: 64x64 images of one coloured shape, template
questions, 13 one-word answers) and ships them as ordinary Hugging Face folders under
``tokenreduce/reference/models/<name>/``:

- ``easyvqa-llava``: ``LlavaForConditionalGeneration`` (CLIP tower with CLS, ``vision_feature_layer=-2``,
  Llama decoder), 144 visual tokens per image;
- ``easyvqa-qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` (windowed Qwen2.5-VL ViT, no CLS
  token, 4 px patches merged 2x2; Qwen2 decoder with 3-D M-RoPE), 144 visual tokens per image.

Each folder holds ``config.json``, ``model.safetensors``, the tokenizer and processor files and a
``README.md`` model card (training command, wall time, data split, accuracy). Load one with::

    from tokenreduce.reference import load_reference
    model, processor = load_reference("easyvqa-llava")

or with plain ``LlavaForConditionalGeneration.from_pretrained(reference_dir("easyvqa-llava"))``.
Training: ``python -m tokenreduce.reference.train --arch llava --out DIR`` (see
:mod:`tokenreduce.reference.train`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["REFERENCE_MODELS", "reference_names", "reference_dir", "load_reference", "load_folder"]

#: Names of the reference models this package may ship (a name is loadable once its folder exists).
REFERENCE_MODELS = ("easyvqa-llava", "easyvqa-qwen2_5_vl")


def _models_root() -> Path:
    return Path(str(resources.files(__package__) / "models"))


def reference_names() -> list[str]:
    """Names of the reference models shipped in this installation (folders with a ``config.json``)."""
    root = _models_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def reference_dir(name: str = "easyvqa-llava") -> Path:
    """The packaged folder of reference model ``name`` (a plain ``save_pretrained`` folder).

    Raises:
        KeyError: no shipped reference model has that name (the message lists the shipped ones).
    """
    path = _models_root() / name
    if not (path / "config.json").is_file():
        raise KeyError(f"no reference model named {name!r}; shipped: {reference_names()}")
    return path


def load_folder(path: str | Path, attn_implementation: str = "sdpa"):
    """Load a reference-model folder (packaged or freshly trained): ``(model, processor)``.

    The model comes back in eval mode, fp32, on CPU. LLaVA folders load with the stock
    ``LlavaForConditionalGeneration`` / ``AutoProcessor``; Qwen2.5-VL folders with
    ``Qwen2_5_VLForConditionalGeneration`` and the image-only processor
    :class:`tokenreduce.reference.build.ImageOnlyQwen2_5_VLProcessor` (the stock processor also
    builds a video processor, which needs torchvision).
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=torch.float32
        )
        processor = AutoProcessor.from_pretrained(path)
    elif model_type == "qwen2_5_vl":
        from tokenreduce.reference.build import ImageOnlyQwen2_5_VLProcessor

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=torch.float32
        )
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path)
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not a reference architecture (llava, qwen2_5_vl)")
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def load_reference(name: str = "easyvqa-llava", attn_implementation: str = "sdpa"):
    """Load a shipped reference model and its processor: ``(model, processor)``.

    Args:
        name: one of :func:`reference_names` (``"easyvqa-llava"``, ...).
        attn_implementation: ``"sdpa"``, ``"eager"`` or (CUDA with flash-attn) ``"flash_attention_2"``.

    Returns:
        the model in eval mode (fp32, CPU) and its processor (left padding).
    """
    return load_folder(reference_dir(name), attn_implementation=attn_implementation)
