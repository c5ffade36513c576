"""Reference VLMs trained by the project on easy-VQA and shipped inside the package.

Small LLaVA and Qwen2.5-VL models trained from scratch on easy-VQA (no weights to download, and
visual tokens that matter), shipped as ordinary Hugging Face folders under
``tokenreduce/reference/models/<name>/`` with a model card each. Load one with
``load_reference("easyvqa-llava")``; :mod:`tokenreduce.reference.data` reads easy-VQA and
:mod:`tokenreduce.reference.evaluate` scores greedy answers. The training code lives outside the
package, in the repository's ``tools/reference/`` (see its ``TRAINING.md``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["REFERENCE_MODELS", "reference_names", "reference_dir", "load_reference", "load_folder"]

#: Names of the reference models this package may ship (a name is loadable once its folder exists).
REFERENCE_MODELS = ("easyvqa-llava", "easyvqa-qwen2_5_vl", "scenes-llava")


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

    The model comes back in eval mode, fp32, on CPU; model class and processor come from the
    architecture registered for the folder's ``model_type`` (:meth:`ArchSpec.model_class`,
    :meth:`ArchSpec.load_processor`); the processor pads on the left.

    Raises:
        UnsupportedModelError: no architecture is registered for the folder's ``model_type``.
    """
    import torch

    from tokenreduce.core.registry import get_registry

    path = Path(path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    spec = get_registry().spec_for(model_type, what=f"loading the reference model in {path}")
    model = spec.model_class().from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    processor = spec.load_processor(path)
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
