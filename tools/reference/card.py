"""The ``README.md`` model card of an exported reference model, written from its ``metrics.json``
(``tools/reference/TRAINING.md``)."""

from __future__ import annotations

from typing import Any

from tokenreduce.core.registry import get_registry
from tokenreduce.reference import data, scenes

__all__ = ["model_card"]


def _run_lines(m: dict[str, Any]) -> list[str]:
    """Card lines for each training run behind a model (``--init-from`` chains), oldest first."""
    runs = list(m.get("previous_runs", [])) + [m]
    lines = []
    for k, run in enumerate(runs, 1):
        t = run["train"]
        prefix = f"run {k} of {len(runs)}: " if len(runs) > 1 else ""
        own = run["commands"][len(runs[k - 2]["commands"]) :] if k > 1 else run["commands"]
        lines.append(
            f"- {prefix}command"
            + ("s (run, then resumed)" if len(own) > 1 else "")
            + ": "
            + ", then ".join(f"`{c}`" for c in own)
        )
        vp = run.get("vision_pretrain")
        lp = run.get("language_pretrain")
        if lp:
            lines.append(
                f"  - stage 0, language pre-training on symbolic scenes ({lp['steps']} steps of "
                f"{t['images_per_batch']} images x their questions, peak lr {t['language_pretrain_lr']}): the language "
                "model answers the training questions with each image replaced by 1-3 patches of every object and of "
                "every cell's background, each given as the sum of learned embeddings of its labels (shape, colour, "
                "size, grid row and column) at its position in the real prompt (`tools/reference/symbolic.py`); "
                f"held-out accuracy on symbolic scenes at the end: {lp['val_accuracy']:.4f}"
            )
        if vp and t.get("task") == "scenes":
            lines.append(
                f"  - stage 1, vision pre-training ({t['vision_pretrain_steps']} steps of "
                f"{t['images_per_batch'] * t['questions_per_image']} images, peak lr {t['vision_pretrain_lr']}): the "
                "vision tower and projector learn the shape and colour (or emptiness) of each cell of every training "
                "scene's 3x3 grid from the visual tokens average-pooled over the cell, through linear heads thrown "
                "away afterwards"
                + (
                    "; every visual token is also classified by itself (shape, colour, size of the object covering "
                    "its patch, grid row and column) and, after stage 0, pulled towards its patch's symbol "
                    "(mean squared distance)"
                    if lp
                    else ""
                )
                + f"; training accuracy at the end (per cell): shape {vp['shape_accuracy']:.3f}, colour "
                f"{vp['color_accuracy']:.3f}"
            )
        elif vp:
            target = (
                "through two linear heads thrown away afterwards"
                if t.get("vision_pretrain_target", "heads") == "heads"
                else "as CLIP-style cosine logits against the language model's input embeddings of the 11 "
                "shape/colour words (trained too), so that visual tokens and those words share a space"
            )
            lines.append(
                f"  - stage 1, vision pre-training ({t['vision_pretrain_steps']} steps of "
                f"{t['images_per_batch'] * t['questions_per_image']} images, peak lr {t['vision_pretrain_lr']}): the "
                "vision tower and projector learn each training image's shape and colour (labels read off its "
                f"questions, `tokenreduce.reference.data.image_tags`) from the mean visual token, {target}; "
                f"training accuracy at the end: shape {vp['shape_accuracy']:.3f}, colour {vp['color_accuracy']:.3f}"
            )
        lines.append(
            f"  - {'stage 2, ' if vp else ''}VQA training: {t['steps']} AdamW steps of {t['images_per_batch']} images x up "
            f"to {t['questions_per_image']} of their questions, peak lr {t['lr']}, {t['warmup_steps']} warm-up steps, "
            f"cosine decay to {t['min_lr_ratio']} x peak, weight decay {t['weight_decay']}, grad clip {t['grad_clip']}, "
            f"horizontal flips: {t['hflip']}; loss on the answer token and `</s>` only"
            + ("; yes/no answers balanced within plain and within negated questions" if t.get("balance_yes_no") else "")
            + (f"; started from the weights of run {k - 1}" if k > 1 else f"; seed {t['seed']}")
        )
        lines.append(
            f"  - selected checkpoint: step {run['best_step']} (held-out train accuracy {run['best_val_accuracy']:.4f})"
            + (f"; its test accuracy: {run['test_accuracy']:.4f}" if k < len(runs) and "test_accuracy" in run else "")
        )
    lines.append(
        "- each step runs each image's prompt prefix (`<s> USER:` + image tokens) once and its questions on its "
        "KV cache: the same function as the full-sequence forward, several times cheaper"
    )
    return lines


def model_card(m: dict[str, Any]) -> str:
    """The ``README.md`` model card of an exported reference model, from its metrics."""
    a, t = m["arch"], m["train"]
    tower = "CLIP ViT (with CLS token)" if a["arch"] == "llava" else "Qwen2.5-VL windowed ViT (2x2 patch merger)"
    decoder = "Llama" if a["arch"] == "llava" else "Qwen2 (3-D M-RoPE)"
    cls = get_registry().spec_for(a["arch"]).model_class().__name__
    if t.get("task") == "scenes":
        return _scenes_card(m, tower, decoder, cls)
    lines = [
        f"# {m['name']}",
        "",
        f"A small `{cls}` trained from scratch by `tokenreduce` on the easy-VQA data set "
        "(the `easy-vqa` Python package), shipped so that visual-token reduction can be measured on a "
        "model whose visual tokens matter, without downloading weights.",
        "",
        "## Architecture",
        "",
        f"- vision tower: {tower}, {a['vision_layers']} layers, width {a['vision_hidden']}, "
        f"{a['vision_heads']} heads, {a['image_size']} px input, {a['patch']} px patches"
        + (
            ', features from layer -2, CLS dropped (`vision_feature_select_strategy="default"`)'
            if a["arch"] == "llava"
            else ""
        ),
        f"- visual tokens per image: {m['visual_tokens']}",
        f"- language model: {decoder}, {a['text_layers']} decoder layers, width {a['text_hidden']}, "
        f"{a['text_heads']} heads ({a['text_kv_heads']} KV heads), MLP {a['text_intermediate']}, vocabulary {a['vocab_size']}",
        f"- parameters: {m['parameters']:,} ({m['weights_bytes'] / 1e6:.2f} MB fp32 safetensors)",
        "- tokenizer: word level over the easy-VQA vocabulary, `<s>` prepended, left padding",
        "",
        "## Prompt and answer",
        "",
        "```",
        data.prompt("what color is the shape?", a["arch"]),
        "```",
        "",
        "The model answers with one word (one of the 13 easy-VQA answers) followed by `</s>`; greedy "
        "`generate(max_new_tokens=3)` stops there.",
        "",
        "## Training",
        "",
        f"- data: easy-VQA train split (4,000 images, 38,575 questions) minus the questions of "
        f"{t['val_images']} held-out training images (seed {t['seed']}), used for model selection only; "
        "the test split (1,000 images, 9,673 questions) was never used for selection",
        *_run_lines(m),
        f"- wall time in all: {m['wall_seconds'] / 60:.1f} min ({m['train_seconds'] / 60:.1f} min of "
        f"optimizer steps, the rest held-out evaluation and checkpoints; + {m['prep_seconds']:.0f} s data "
        "preparation per start; the final test evaluation not counted)",
        f"- hardware: {m['hardware']} (a shared machine: wall time depends on other jobs' load)",
        "",
        "## Accuracy (greedy `generate()`, exact match of the answer word)",
        "",
    ]
    if "test_accuracy" in m:
        lines += [
            f"- easy-VQA test split, {m['test_questions']:,} questions: **{m['test_accuracy']:.4f}**",
        ]
        if "ci_subset_accuracy" in m:
            lines.append(
                f"- the 200 fixed test questions checked by CI (`fixed_test_subset(200, seed=0)`): "
                f"{m['ci_subset_accuracy']:.4f}"
            )
        lines += ["", "Per answer:", "", "| answer | accuracy |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in m["test_accuracy_per_answer"].items()]
    else:
        lines.append("- not measured (`--test-questions 0`)")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from tokenreduce.reference import load_reference",
        f'model, processor = load_reference("{m["name"]}")',
        "```",
        "",
        "or with plain `from_pretrained` on this folder"
        + (
            f" (`{cls}` / `AutoProcessor`)."
            if a["arch"] == "llava"
            else f" (`{cls}`, and "
            "`tokenreduce.adapters.qwen2_5_vl.processor.ImageOnlyQwen2_5_VLProcessor.from_pretrained` for the processor)."
        ),
        "",
    ]
    return "\n".join(lines)


def _scenes_card(m: dict[str, Any], tower: str, decoder: str, cls: str) -> str:
    """The model card of a reference model trained on the generated scenes (``--task scenes``)."""
    a, t = m["arch"], m["train"]
    n_train, n_test = scenes.SPLIT_SIZES["train"], scenes.SPLIT_SIZES["test"]
    k = scenes.QUESTIONS_PER_IMAGE
    lines = [
        f"# {m['name']}",
        "",
        f"A small `{cls}` trained from scratch by `tokenreduce` on its generated cluttered-scene questions "
        "(`tokenreduce.reference.scenes`: 3 to 6 objects per image, questions about one object or a relation), "
        "shipped so that visual-token reduction can be measured on a model whose answers depend on which "
        "visual tokens are kept, without downloading weights.",
        "",
        "## Architecture",
        "",
        f"- vision tower: {tower}, {a['vision_layers']} layers, width {a['vision_hidden']}, "
        f"{a['vision_heads']} heads, {a['image_size']} px input, {a['patch']} px patches",
        f"- visual tokens per image: {m['visual_tokens']}",
        f"- language model: {decoder}, {a['text_layers']} decoder layers, width {a['text_hidden']}, "
        f"{a['text_heads']} heads ({a['text_kv_heads']} KV heads), MLP {a['text_intermediate']}, vocabulary {a['vocab_size']}",
        f"- parameters: {m['parameters']:,} ({m['weights_bytes'] / 1e6:.2f} MB fp32 safetensors)",
        "- tokenizer: word level over the scenes vocabulary, `<s>` prepended, left padding",
        "",
        "## Prompt and answer",
        "",
        "```",
        data.prompt("what color is the shape next to the red circle?", a["arch"]),
        "```",
        "",
        "The model answers with one word or digit followed by `</s>`; greedy `generate(max_new_tokens=3)` stops there.",
        "",
        "## Training",
        "",
        f"- data: the scenes train split ({n_train:,} images, {n_train * k:,} questions) minus the questions of "
        f"{t['val_images']} held-out training images (seed {t['seed']}), used for model selection only; the test "
        f"split ({n_test:,} images, {n_test * k:,} questions) was never used for selection",
        *_run_lines(m),
        f"- wall time in all: {m['wall_seconds'] / 60:.1f} min ({m['train_seconds'] / 60:.1f} min of "
        f"optimizer steps, the rest held-out evaluation and checkpoints; + {m['prep_seconds']:.0f} s data "
        "preparation per start; the final test evaluation not counted)",
        f"- hardware: {m['hardware']} (a shared machine: wall time depends on other jobs' load)",
        "",
        "## Accuracy (exact match of the answer word)",
        "",
    ]
    if "test_accuracy" in m:
        how = (
            "teacher forcing: the answer and `</s>` both the argmax, which is what greedy decoding returns"
            if m.get("test_method") == "teacher_forced"
            else "greedy `generate()`"
        )
        lines.append(f"Measured by {how}.")
        lines.append("")
        lines.append(f"- scenes test split, {m['test_questions']:,} questions: **{m['test_accuracy']:.4f}**")
        if "ci_subset_accuracy" in m:
            lines.append(
                f"- the 200 fixed test questions checked by CI (`scenes.fixed_test_subset(200, seed=0)`): "
                f"{m['ci_subset_accuracy']:.4f}"
            )
        lines += ["", "Per question type:", "", "| type | questions | accuracy |", "| --- | --- | --- |"]
        lines += [
            f"| {typ} | {v['n']:,} | {v['accuracy']:.4f} |" for typ, v in m.get("test_accuracy_per_type", {}).items()
        ]
        lines += ["", "Per answer:", "", "| answer | accuracy |", "| --- | --- |"]
        lines += [f"| {k_} | {v:.4f} |" for k_, v in m["test_accuracy_per_answer"].items()]
    else:
        lines.append("- not measured (`--test-questions 0`)")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from tokenreduce.reference import load_folder",
        "model, processor = load_folder(FOLDER)  # this folder",
        "```",
        "",
        f"or with plain `from_pretrained` on this folder (`{cls}` / `AutoProcessor`).",
        "",
    ]
    return "\n".join(lines)
