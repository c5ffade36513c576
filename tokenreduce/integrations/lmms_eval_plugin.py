"""The ``tokenreduce`` model of lmms-eval: any supported VLM with a tokenreduce plan attached,
found by lmms-eval through its ``lmms_eval.models`` entry-point group (filled by
:func:`manifests`; nothing forked or copied)::

    python -m lmms_eval --model tokenreduce \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plan=pio_64 --tasks pope --batch_size 8

``model_args`` (validated; errors are one line and name these keys), batching,
``generate_until`` / ``loglikelihood`` and what is refused: ``docs/lmms-eval.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenreduce.core.errors import PlanError, TokenReduceError
from tokenreduce.measure.configs import SourceKeys
from tokenreduce.measure.shard import local_device, shard_from_env

__all__ = ["KEYS", "ModelArgs", "TokenReduceLMM", "manifests", "MODEL_NAME"]

#: the name lmms-eval knows this model by (``--model tokenreduce``)
MODEL_NAME = "tokenreduce"
#: how the loader's errors name the settings here: by their model_args keys
KEYS = SourceKeys(
    path="model_args pretrained",
    repo="model_args pretrained",
    revision="model_args revision",
    device="model_args device",
    dtype="model_args dtype",
    attn_implementation="model_args attn_implementation",
    prompt="model_args prompt",
    use_folder="--model_args pretrained=DIR",
)


def manifests():
    """The lmms-eval model manifest of this package (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.TokenReduceLMM")]


class ModelArgs(BaseModel):
    """``--model_args`` of ``--model tokenreduce`` (plus lmms-eval's ``batch_size``/``device``)."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str = Field(description="Hugging Face Hub id or local folder of the checkpoint")
    plan: str | None = Field(default=None, description="plan preset name or YAML plan file; none: unreduced")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    device: str = "auto"
    prompt: str = Field(default="chat_template", description="chat_template, or a template with {question}")
    max_new_tokens: int = Field(default=128, ge=1, description="when the task's generation_kwargs give none")
    trace_file: str | None = Field(default=None, description="append a JSON line per request: kept tokens per layer")
    batch_size: int = Field(default=1, ge=1)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _integer_batch(cls, value: Any) -> Any:
        allowed = "must be a positive integer (requests per generate() call)"
        if isinstance(value, str):
            text = value.strip()
            if text.lower().startswith("auto"):
                raise ValueError(f"{allowed}; batch_size 'auto' is not supported")
            try:
                value = int(text)
            except ValueError:
                raise ValueError(allowed) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(allowed)
        return value


def _parse_args(kwargs: dict[str, Any]) -> ModelArgs:
    given = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
    if given.get("device") in ("", None):
        given.pop("device", None)
    try:
        return ModelArgs.model_validate(given)
    except ValidationError as exc:
        lines = []
        allowed = ", ".join(ModelArgs.model_fields)
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "model_args"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown model_args key for --model {MODEL_NAME}; known keys: {allowed}")
            elif err["type"] == "missing":
                lines.append(f"  {key}: required (e.g. pretrained=llava-hf/llava-1.5-7b-hf)")
            else:
                message = err["msg"].removeprefix("Value error, ")
                lines.append(f"  {key}: {message} (got {err.get('input')!r})")
        if len(lines) == 1:
            raise TokenReduceError(f"invalid --model_args for --model {MODEL_NAME}: {lines[0].strip()}") from None
        raise TokenReduceError(f"invalid --model_args for --model {MODEL_NAME}:\n" + "\n".join(lines)) from None


def _load_plan(spec: str | None):
    """``None``, a preset name or a YAML file -> a validated Plan (or ``None``)."""
    if spec is None:
        return None
    from tokenreduce.core.plan import parse_plan
    from tokenreduce.core.presets import load_preset

    path = Path(spec).expanduser()
    try:
        if spec.endswith((".yaml", ".yml")) or path.is_file():
            import yaml

            if not path.is_file():
                raise TokenReduceError(f"model_args plan={spec!r}: no such plan file")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                problem = " ".join(str(exc).split())
                raise TokenReduceError(
                    f"model_args plan={spec!r}: the plan file is not valid YAML ({problem})"
                ) from None
            if not isinstance(data, dict):
                raise TokenReduceError(
                    f"model_args plan={spec!r}: the plan file holds a {type(data).__name__}, not a plan (a mapping)"
                )
            data.setdefault("name", path.stem)
            return parse_plan(data)
        return load_preset(spec)
    except PlanError as exc:
        raise PlanError(f"model_args plan={spec!r}: {exc}") from None


def _rank_file(name: str, rank: int) -> str:
    """``trace_file`` of process ``rank`` of several: ``trace.jsonl`` -> ``trace.rank1.jsonl``."""
    path = Path(name)
    return str(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))


def _check_trace_file(name: str) -> None:
    """``trace_file`` can be appended to (checked before the model is loaded, not after the first
    batch); an existing file is left as it is."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise TokenReduceError(f"model_args trace_file={name!r} is a folder; give a file (lines are appended)")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise TokenReduceError(
            f"model_args trace_file={name!r}: cannot write it ({exc.strerror or exc}); give a file in a writable folder"
        ) from None
    if not existed:
        path.unlink()


class TokenReduceLMM(lmms):
    """lmms-eval model: a Hugging Face VLM loaded by tokenreduce, with a plan attached per call."""

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from tokenreduce.api import compile_for
        from tokenreduce.models import load_pretrained

        self.args = _parse_args(kwargs)
        self.plan = _load_plan(self.args.plan)
        # under accelerate launch / torchrun, lmms-eval gives each process the requests of its RANK;
        # each process takes the GPU of its LOCAL_RANK and writes its own trace file
        shard = shard_from_env()
        device = self.args.device if shard is None else local_device(self.args.device, shard.local_rank)
        if self.args.trace_file is not None and shard is not None:
            self.args.trace_file = _rank_file(self.args.trace_file, shard.index)
        if self.args.trace_file is not None:
            _check_trace_file(self.args.trace_file)
        self.loaded = load_pretrained(
            self.args.pretrained,
            revision=self.args.revision,
            dtype=self.args.dtype,
            attn_implementation=self.args.attn_implementation,
            device=device,
            prompt=self.args.prompt,
            keys=KEYS,
        )
        if self.plan is not None:
            try:  # a plan the model cannot run fails here, not mid-evaluation
                compile_for(self.loaded.model, self.plan)
            except PlanError as exc:
                raise PlanError(f"model_args plan={self.args.plan!r}: {exc}") from None
        self.template = self.loaded.prompt_template()
        self.spec = self.loaded.spec
        self.placeholder = self.spec.image_placeholder
        if self.placeholder not in self.template:
            raise TokenReduceError(
                f"model_args prompt: the template {self.template!r} has no image placeholder {self.placeholder!r}"
            )
        self.tokenizer = self.loaded.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size = self.args.batch_size
        self.trace_records: list[dict[str, Any]] = []

    @property
    def device(self) -> torch.device:
        """The model's device (lmms-eval's evaluator puts its cross-process request counts there)."""
        return self.loaded.device

    # -- prompts and inputs -------------------------------------------------------------------
    def _prompt(self, context: str, n_images: int) -> str:
        """The template with the task's text as ``{question}`` and ``n_images`` placeholders where
        the template has its one (images first, as the llava-hf and Qwen chat templates put them).
        A task text that carries its own placeholders keeps them, and none is added."""
        text = context
        if self.placeholder in text:
            return self.template.replace(self.placeholder, "").replace("{question}", text)
        images = self.spec.prompt_images(n_images)
        return self.template.replace(self.placeholder, images).replace("{question}", text)

    def _inputs(self, prompts: list[str], images: list[list[Any]]) -> dict[str, Any]:
        flat = [im for per_doc in images for im in per_doc]
        kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if flat:
            kwargs["images"] = flat
        return self.loaded.to_device(dict(self.loaded.processor(**kwargs)))

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Any]:
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        flat: list[Any] = []
        for v in visuals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        for v in flat:
            if not isinstance(v, Image.Image):
                raise TokenReduceError(
                    f"--model {MODEL_NAME}: task {task!r} doc {doc_id} gives a {type(v).__name__} visual "
                    f"({str(v)[:80]!r}); only images (PIL) are supported, not video or audio"
                )
        return [v.convert("RGB") for v in flat]

    def _attached(self, n_images: int):
        """The plan's attachment, or a no-op context for the unreduced model / text-only requests."""
        import contextlib

        import tokenreduce

        if self.plan is None or n_images == 0:
            return contextlib.nullcontext(None)
        return tokenreduce.apply(self.loaded.model, self.plan)

    def _record(self, att, requests: list[tuple[str, int]]) -> None:
        if att is None or self.args.trace_file is None:
            return
        trace = att.trace
        with open(self.args.trace_file, "a") as f:
            for b, (task, doc_id) in enumerate(requests):
                record = {
                    "task": task,
                    "doc_id": doc_id,
                    "plan": self.plan.name,
                    "visual_per_layer": trace.visual_per_layer(b),
                    "layer_average": trace.layer_average(b),
                }
                f.write(json.dumps(record) + "\n")

    # -- lmms-eval interface ------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Generate an answer for each request; ``args = (context, gen_kwargs, doc_to_visual,
        doc_id, task, split)``. Results come back in the order of ``requests``."""
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((i, context, dict(gen_kwargs or {}), images, doc_id, task))
        out: list[str | None] = [None] * len(items)
        groups: dict[tuple, list] = {}
        for item in items:  # same generation settings and image count batch together
            key = (json.dumps(item[2], sort_keys=True, default=str), len(item[3]))
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                texts = self._generate(batch)
                for item, text in zip(batch, texts):
                    out[item[0]] = text
        return out  # type: ignore[return-value]

    def _generate(self, batch: list[tuple]) -> list[str]:
        gen = dict(batch[0][2])
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if int(gen.get("num_beams", 1) or 1) > 1:
            raise TokenReduceError(f"--model {MODEL_NAME}: num_beams > 1 is not supported (greedy or sampling only)")
        temperature = float(gen.get("temperature", 0) or 0)
        do_sample = bool(gen.get("do_sample", False)) or temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen.get("max_new_tokens") or self.args.max_new_tokens),
            "do_sample": do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if do_sample:
            kwargs["temperature"] = temperature if temperature > 0 else 1.0
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        prompts = [self._prompt(item[1], len(item[3])) for item in batch]
        inputs = self._inputs(prompts, [item[3] for item in batch])
        n_prompt = inputs["input_ids"].shape[1]
        with torch.no_grad(), self._attached(len(batch[0][3])) as att:
            tokens = self.loaded.model.generate(**inputs, **kwargs)
        self._record(att, [(item[5], item[4]) for item in batch])
        texts = self.tokenizer.batch_decode(tokens[:, n_prompt:], skip_special_tokens=True)
        return [_cut_at(text, until) for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``args = (context, doc_to_target, doc_to_visual, doc_id, task, split)``: the summed
        log-probability of the continuation after the prompt, and whether greedy decoding gives it.

        Computed the way ``generate()`` would produce the continuation: the prompt is prefilled
        with the plan attached (so the plan selects on the prompt alone, as when answering), then
        the continuation's tokens are fed one by one on the KV cache.
        """
        results = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target(self.task_dict[task][split][doc_id]) if callable(target) else target
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs([self._prompt(context, len(images))], [images])
            target_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if target_ids.numel() == 0:
                raise TokenReduceError(f"--model {MODEL_NAME}: empty continuation for task {task!r} doc {doc_id}")
            target_ids = target_ids.to(inputs["input_ids"].device)
            with torch.no_grad(), self._attached(len(images)) as att:
                total, greedy = self._score_continuation(inputs, target_ids)
            self._record(att, [(task, doc_id)])
            results.append((total, greedy))
        return results

    def _score_continuation(self, inputs: dict[str, Any], target_ids: torch.Tensor) -> tuple[float, bool]:
        """Log-probability of ``target_ids`` [T] after ``inputs`` (one sample), and whether each of
        its tokens is the argmax: ``generate()`` with every step forced to the next target token,
        reading the raw logits of each step (so the model's own decode positions, cache and, under
        a plan, the pruned prefill are exactly those of answering)."""
        import copy

        from transformers import LogitsProcessorList

        n = int(target_ids.numel())
        config = copy.deepcopy(self.loaded.model.generation_config)
        config.update(
            eos_token_id=None,  # an end-of-sequence token inside the continuation must not stop it
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        out = self.loaded.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([_ForceTokens(target_ids, inputs["input_ids"].shape[1])]),
        )
        logits = torch.stack([step[0] for step in out.logits]).float()  # [T, V], before any processor
        logprobs = F.log_softmax(logits, dim=-1)
        total = float(logprobs.gather(-1, target_ids.view(-1, 1)).sum())
        return total, bool((logprobs.argmax(-1) == target_ids).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise TokenReduceError(f"--model {MODEL_NAME}: multi-round generation is not implemented")


def _cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (stop strings removed)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class _ForceTokens:
    """Logits processor: step ``t`` of ``generate()`` can only pick ``tokens[t]``."""

    def __init__(self, tokens: torch.Tensor, n_prompt: int):
        self.tokens, self.n_prompt = tokens, n_prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.n_prompt]] = 0.0
        return forced
