"""Evaluation tasks and the evaluation driver: vanilla first, then each plan, same inputs.

Tasks:

- **easy-VQA** (``easy_vqa``; the ``easy_vqa`` package: 64x64 pictures of one coloured shape;
  4,000 train / 1,000 test images, 38,575 / 9,673 questions, 13 one-word answers: shapes,
  colours, yes/no);
- **scenes** (``scenes``; :mod:`tokenreduce.reference.scenes`: generated 96x96 cluttered scenes of
  3 to 6 objects, 6,000 test questions of six types, rendered on the fly), whose questions carry
  their type, so the table also has the accuracy per question type.

The evaluated subset is fixed and documented: the question indices of the split are shuffled
with ``random.Random(seed).shuffle`` and the first ``n`` are taken (``seed`` 0 and ``n`` from
``conf/task/<name>.yaml`` unless overridden), so every run, plan and machine sees the same
questions in the same order.

The driver (:func:`evaluate`) generates greedily in batches (left padding) with vanilla first,
then each plan, and reports per plan: accuracy against the gold answers
(:func:`tokenreduce.measure.fidelity.accuracy`), retention (share of the vanilla accuracy),
first-token agreement, exact match of the whole answer and first-token KL(vanilla || plan)
against vanilla, FLOPs in both conventions and KV-cache bytes from the accounting with the
trace's actual per-sample counts (:func:`tokenreduce.measure.flops.account`; KV bytes at the
model's dtype, e.g. 4 bytes per element in fp32), the layer average of visual tokens, and wall
time.

Noise levels (:func:`bootstrap_noise`): per configuration a 95% percentile-bootstrap interval of
the accuracy, and per plan the paired difference to vanilla (its paired bootstrap interval and
the questions right only under the plan or only under vanilla). The :data:`BOOTSTRAP_RESAMPLES`
resamples of the questions are drawn with a fixed seed and shared by every configuration, so the
intervals are a function of the per-question correctness alone: a sharded run gets the same ones.

The driver works in two steps: :func:`measure` generates and keeps one record per question and
configuration (:class:`EvalRecords`: answer, correctness, agreement and KL against vanilla, kept
tokens, FLOPs), and :func:`summarize` turns complete records into the table (means in question
order).  A sharded run (:mod:`tokenreduce.measure.shard`, docs/scaling.md) measures a subset of
the batches per process and summarizes the merged records with the same code, so its table equals
a single-process run's.

With ``log_samples`` the result also holds one record per question and configuration (the
question, gold answer, prediction, kept visual tokens per stage, first-token KL), which
:meth:`EvalResult.write_samples` writes as one JSONL file per configuration (docs/cli.md).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenreduce.core.errors import TokenReduceError

from . import fidelity
from .progress import progress_bar

__all__ = [
    "TaskSettings",
    "EvalSettings",
    "Example",
    "load_task",
    "format_prompt",
    "PlanOutputs",
    "EvalRecords",
    "EvalResult",
    "SAMPLE_KEYS",
    "batch_count",
    "bootstrap_noise",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "evaluate",
    "measure",
    "summarize",
]

VANILLA = "vanilla"
#: resamples of the questions behind every bootstrap interval of the evaluation
BOOTSTRAP_RESAMPLES = 1000
#: seed of the resampling (``torch.Generator().manual_seed``): fixed, so the intervals are reproducible
BOOTSTRAP_SEED = 0
#: two-sided level of the bootstrap intervals
BOOTSTRAP_LEVEL = 0.95


class TaskSettings(BaseModel):
    """A task conf (``conf/task/<name>.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["easy_vqa", "scenes"] = Field(
        default="easy_vqa",
        description="the task: easy_vqa (the easy-vqa package) or scenes (generated cluttered scenes, "
        "tokenreduce.reference.scenes; accuracy per question type too)",
    )
    split: Literal["train", "test"] = "test"
    n: int = Field(default=64, ge=1, description="questions: the first n after a fixed shuffle of the split")
    seed: int = Field(default=0, description="seed of the fixed shuffle (random.Random(seed).shuffle)")
    question_format: str = Field(
        default="{question}", description="how a question is written into the prompt's {question}"
    )
    description: str = ""


class EvalSettings(BaseModel):
    """The ``eval`` section of the config."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, description="questions per generate() (left padding)")
    max_new_tokens: int = Field(default=8, ge=1, description="greedy answer length limit")
    progress: bool = Field(
        default=True,
        description="progress on stderr: a bar on a terminal, else one line per configuration",
    )
    warmup: bool = Field(default=True, description="one untimed generate() of the first batch before timing")
    keep_answers: bool = Field(default=True, description="write every answer of every plan into results.json")
    log_samples: bool = Field(
        default=False,
        description="write samples/<config>.jsonl: one line per question (question, gold answer, prediction, "
        "kept visual tokens per stage, first-token KL)",
    )
    plot: bool = Field(default=True, description="write accuracy_cost.png and .svg (accuracy against FLOPs and time)")
    plot_metric: Literal["accuracy", "retention"] = Field(
        default="accuracy", description="the y axis of the plot: accuracy, or retention (accuracy / vanilla accuracy)"
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads during the evaluation (default: leave as is; 1 is much faster on a "
        "machine whose cores are busy with other work)",
    )
    cache_inputs_mib: int = Field(
        default=1024,
        ge=0,
        description="keep the processed inputs of the batches (images decoded and preprocessed once for all "
        "configurations) up to this many MiB; 0: preprocess again for every configuration",
    )
    shard: str | None = Field(
        default=None,
        description="run shard i of n (i/n, 0-based: 0/4 ... 3/4): the batches i, i+n, ... with every "
        "configuration, written to out_dir/shards/ and merged when all are there; null: RANK/WORLD_SIZE of "
        "torchrun or accelerate launch when WORLD_SIZE > 1, else one process (docs/scaling.md)",
    )
    merge: str | None = Field(
        default=None,
        description="merge the shard files of a sharded eval found in this folder (its out_dir, or a folder "
        "holding its shards/ files) into results.json and results.md, as one process would write them; "
        "nothing is evaluated",
    )

    @field_validator("shard", mode="before")
    @classmethod
    def _check_shard(cls, value: Any) -> Any:
        from .shard import parse_shard

        if value is not None:
            parse_shard(value)
        return value


@dataclass
class Example:
    """One question: ``index`` in the split's question list, its image (a file, or a generated
    scene rendered on demand) and the gold answer.

    Attributes:
        image_path: the image file (easy-VQA); ``None`` when the image is drawn from ``scene``.
        scene: the generated scene (:class:`tokenreduce.reference.scenes.Scene`, small and
            picklable) of a scenes question; ``None`` for a task with image files.
        qtype: the question type (scenes: one of
            :data:`tokenreduce.reference.scenes.QUESTION_TYPES`); ``None`` when the task has none.
    """

    index: int
    question: str
    answer: str
    image_id: int
    image_path: str | None
    scene: Any = None
    qtype: str | None = None

    def image(self):
        """The picture as an RGB ``PIL.Image`` (a scene is rendered on each call)."""
        if self.scene is not None:
            from tokenreduce.reference import scenes

            return scenes.render(self.scene)
        if self.image_path is None:
            raise TokenReduceError(f"question {self.index} has neither an image file nor a scene")
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def _fixed_order(total: int, settings: TaskSettings, task: str) -> list[int]:
    """The first ``settings.n`` of ``range(total)`` after ``random.Random(settings.seed).shuffle``."""
    if settings.n > total:
        raise TokenReduceError(f"task.n={settings.n} exceeds the {total} questions of {task}'s {settings.split} split")
    order = list(range(total))
    random.Random(settings.seed).shuffle(order)
    return order[: settings.n]


def load_task(settings: TaskSettings | Mapping[str, Any]) -> list[Example]:
    """The fixed subset of a task (see the module docstring)."""
    settings = settings if isinstance(settings, TaskSettings) else TaskSettings.model_validate(dict(settings))
    if settings.name == "scenes":
        from tokenreduce.reference import scenes

        split = scenes.load_split(settings.split)
        return [
            Example(
                i,
                split.questions[i],
                split.answers[i],
                split.image_ids[i],
                None,
                scene=split.scenes[split.image_ids[i]],
                qtype=split.types[i],
            )
            for i in _fixed_order(len(split), settings, "scenes")
        ]
    try:
        import easy_vqa
    except ImportError:  # pragma: no cover - a declared dependency
        raise TokenReduceError("task easy_vqa needs the easy-vqa package (pip install easy-vqa)") from None
    if settings.split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    order = _fixed_order(len(texts), settings, "easy_vqa")
    return [Example(i, texts[i], answers[i], image_ids[i], paths[image_ids[i]]) for i in order]


def format_prompt(template: str, question: str, question_format: str = "{question}") -> str:
    """The model's prompt for one question: ``{question}`` in ``template`` replaced by the
    question written through ``question_format`` (plain replacement: other braces are kept)."""
    if "{question}" not in template:
        raise TokenReduceError(f"prompt template {template!r} has no {{question}} placeholder")
    return template.replace("{question}", question_format.replace("{question}", question))


@dataclass
class PlanOutputs:
    """What one configuration generated for the evaluated batches (in example order).

    Attributes:
        doc_ids: per example, its position in the evaluated subset.
        answers: decoded answers (special tokens skipped, stripped).
        tokens: generated ids up to the first end-of-sequence token.
        batch_logits: per batch, ``[B, V]`` float32 CPU raw logits of the first generated position.
        n_visual, n_text: per example, tokens of the prompt.
        visual_per_layer: per example, visual tokens each decoder layer saw.
        accounting: per example, the FLOP/KV accounting dict (``None`` when unavailable).
        seconds: wall time of all of this configuration's ``generate()`` calls.
        select_seconds: time the stages spent scoring and selecting (sum over batches).
        clamped: per example, the stages whose keep count was clamped (the plan asked for more
            than the stage had, or a ratio rounded to 0: ``StageTrace.requested`` vs ``kept``).
        stage_layers: the cut layer of each stage (empty for vanilla).
        kept_per_stage: per example, the visual tokens each stage kept (``StageTrace.visual_after``).
    """

    name: str
    doc_ids: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    batch_logits: list[torch.Tensor] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)
    n_text: list[int] = field(default_factory=list)
    visual_per_layer: list[list[int]] = field(default_factory=list)
    accounting: list[dict[str, Any] | None] = field(default_factory=list)
    seconds: float = 0.0
    select_seconds: float = 0.0
    clamped: list[int] = field(default_factory=list)
    stage_layers: list[int] = field(default_factory=list)
    kept_per_stage: list[list[int]] = field(default_factory=list)


#: the keys of a per-sample log line (``EvalResult.samples``, docs/cli.md); a record of
#: :class:`EvalRecords` has these and the per-question numbers the table is computed from
SAMPLE_KEYS = (
    "doc_id",
    "question_id",
    "image_id",
    "question",
    "answer",
    "prediction",
    "correct",
    "first_token_agree",
    "first_token_kl",
    "stage_layers",
    "kept_per_stage",
    "visual_tokens",
    "layer_average",
)


@dataclass
class EvalRecords:
    """What the driver measured, before it is summed up into a table: per configuration one
    record per evaluated question, plus the configuration's times.  A single process has every
    question; a shard of a sharded run has its batches' questions, and :meth:`merge` joins the
    shards' records into what one process would have.  :func:`summarize` turns complete records
    into the :class:`EvalResult` (the same code for a single and a merged run, so their tables
    are equal).

    A record has the keys of :data:`SAMPLE_KEYS` plus ``exact_match`` (whole answer equal to
    vanilla's), ``text_tokens``, ``flops_true``, ``flops_paper``, ``kv_bytes`` (``None`` when the
    accounting is unavailable), ``clamped_stages`` (stages whose keep count was clamped) and
    ``qtype`` (the question type, ``None`` when the task has none; records of older shard files
    may lack it, which reads as ``None``).

    Attributes:
        n_examples: the size of the evaluated subset (``task.n``), whatever part of it is here.
        names: configuration names, vanilla first.
        plans: name -> the plan as JSON (``None`` for vanilla).
        records: name -> records in ``doc_id`` order.
        seconds, select_seconds: name -> wall time of its ``generate()`` calls, and of its stages'
            scoring and selection (summed over batches, and over shards when merged).
        notes: notes of the run (FLOP accounting problems).
    """

    n_examples: int
    names: list[str]
    plans: dict[str, dict[str, Any] | None]
    records: dict[str, list[dict[str, Any]]]
    seconds: dict[str, float]
    select_seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_examples": self.n_examples,
            "names": self.names,
            "plans": self.plans,
            "records": self.records,
            "seconds": self.seconds,
            "select_seconds": self.select_seconds,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecords:
        return cls(
            n_examples=int(data["n_examples"]),
            names=list(data["names"]),
            plans=dict(data["plans"]),
            records={k: list(v) for k, v in data["records"].items()},
            seconds={k: float(v) for k, v in data["seconds"].items()},
            select_seconds={k: float(v) for k, v in data["select_seconds"].items()},
            notes=list(data.get("notes") or []),
        )

    @classmethod
    def merge(cls, parts: list[EvalRecords]) -> EvalRecords:
        """The shards' records as one run: records joined in ``doc_id`` order, times summed,
        notes kept once each (in shard order).

        Raises:
            TokenReduceError: parts of different runs (configurations, subset size), a question
                in two parts or in none.
        """
        if not parts:
            raise TokenReduceError("EvalRecords.merge: nothing to merge")
        first = parts[0]
        for i, part in enumerate(parts[1:], 1):
            if part.names != first.names or part.plans != first.plans or part.n_examples != first.n_examples:
                raise TokenReduceError(
                    f"EvalRecords.merge: part {i} evaluated {part.names} on {part.n_examples} questions, part 0 "
                    f"{first.names} on {first.n_examples}; the parts must come from one run"
                )
        records = {}
        for name in first.names:
            joined = sorted((r for part in parts for r in part.records[name]), key=lambda r: r["doc_id"])
            ids = [r["doc_id"] for r in joined]
            if ids != list(range(first.n_examples)):
                seen = set(ids)
                missing = sorted(set(range(first.n_examples)) - seen)
                twice = sorted({d for d in ids if ids.count(d) > 1})
                raise TokenReduceError(
                    f"EvalRecords.merge: configuration {name!r} has {len(ids)} records for {first.n_examples} "
                    f"questions (missing doc_id {missing[:10]}, doubled {twice[:10]}); the parts must cover the "
                    "subset once"
                )
            records[name] = joined
        return cls(
            n_examples=first.n_examples,
            names=list(first.names),
            plans=dict(first.plans),
            records=records,
            seconds={n: sum(p.seconds[n] for p in parts) for n in first.names},
            select_seconds={n: sum(p.select_seconds[n] for p in parts) for n in first.names},
            notes=list(dict.fromkeys(note for p in parts for note in p.notes)),
        )


@dataclass
class EvalResult:
    """Metrics per configuration (vanilla first) plus the examples and per-example answers.

    ``samples`` (filled when ``EvalSettings.log_samples`` is on): configuration name -> one
    record per example, in example order, with the keys ``doc_id`` (position in the evaluated
    subset), ``question_id`` (index in the split's question list), ``image_id``, ``question``,
    ``answer`` (gold), ``prediction``, ``correct``, ``first_token_agree`` (with vanilla),
    ``first_token_kl`` (KL(vanilla || this configuration) of the first token, nats),
    ``stage_layers`` and ``kept_per_stage`` (the cut layer and the visual tokens kept by each
    stage; empty for vanilla), ``visual_tokens`` (before any cut) and ``layer_average``, plus
    ``qtype`` (the question type) when the task's questions have types.
    """

    task: dict[str, Any]
    metrics: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    notes: list[str]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``task``, ``metrics``, ``notes``, ``examples`` (the samples go to :meth:`write_samples`)."""
        return {"task": self.task, "metrics": self.metrics, "notes": self.notes, "examples": self.examples}

    def write_samples(self, folder: str | Path) -> list[Path]:
        """Write ``folder/<config>.jsonl`` for every configuration (one JSON object per line, keys as
        in the class docstring; a name's characters other than letters, digits, ``._-`` become
        ``_``) and return the paths.  Raises when the result holds no samples."""
        if not self.samples:
            raise TokenReduceError("write_samples: this result has no samples; evaluate with eval.log_samples=true")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths, used = [], set()
        for name, records in self.samples.items():
            stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "config"
            while stem in used:  # two names that sanitise alike
                stem += "_"
            used.add(stem)
            path = folder / f"{stem}.jsonl"
            with path.open("w") as f:
                for record in records:
                    f.write(json.dumps(record, allow_nan=False) + "\n")
            paths.append(path)
        return paths

    _COLUMNS = (
        ("config", "name", "{}"),
        ("layer avg", "layer_average", "{:.1f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("retention", "retention", "{:.1%}"),
        ("1st-tok agree", "first_token_agreement", "{:.3f}"),
        ("exact match", "exact_match", "{:.3f}"),
        ("1st-tok KL", "first_token_kl", "{:.4f}"),
        ("FLOPs true", "flops_true", "si"),
        ("FLOPs paper", "flops_paper", "si"),
        ("KV MiB", "kv_mib", "{:.2f}"),
        ("s", "seconds", "{:.2f}"),
    )

    #: the noise columns of results.md, inserted before the last column (time)
    _NOISE_COLUMNS = ("±", "Δ acc [95%]", "only plan/vanilla right")

    def _rows(self, noise: bool = False) -> tuple[list[str], list[list[str]]]:
        """Header and rows of :attr:`_COLUMNS`; with ``noise`` (and intervals in every configuration's
        metrics) the :attr:`_NOISE_COLUMNS` before the time column: the half-width of the accuracy's
        interval, the paired difference to vanilla with its interval, and the questions right only
        under the plan / only under vanilla."""
        from .latency import format_si

        header = [c[0] for c in self._COLUMNS]
        noise = noise and bool(self.metrics) and all("accuracy_ci" in m for m in self.metrics)
        if noise:
            header[-1:-1] = self._NOISE_COLUMNS
        rows = []
        for m in self.metrics:
            row = []
            for _, key, fmt in self._COLUMNS:
                value = m.get(key)
                row.append("-" if value is None else format_si(value) if fmt == "si" else fmt.format(value))
            if noise:
                lo, hi = m["accuracy_ci"]
                cells = [f"{(hi - lo) / 2:.3f}", "-", "-"]
                if "accuracy_diff" in m:
                    d_lo, d_hi = m["accuracy_diff_ci"]
                    cells[1] = f"{m['accuracy_diff']:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}]"
                    cells[2] = f"{m['only_plan_correct']}/{m['only_vanilla_correct']}"
                row[-1:-1] = cells
            rows.append(row)
        return header, rows

    def table(self) -> str:
        from .latency import format_table

        header, rows = self._rows()
        return format_table(rows, header)

    def _type_rows(self) -> tuple[list[str], list[list[str]]] | None:
        """The accuracy-by-question-type table, or ``None`` when the questions have no types."""
        typed = [m for m in self.metrics if m.get("accuracy_by_type")]
        if not typed:
            return None
        types = list(typed[0]["accuracy_by_type"])
        header = ["config", *(f"{t} (n={typed[0]['accuracy_by_type'][t]['n']})" for t in types)]
        rows = []
        for m in typed:
            by_type = m["accuracy_by_type"]
            rows.append([m["name"], *(f"{by_type[t]['accuracy']:.3f}" if t in by_type else "-" for t in types)])
        return header, rows

    def markdown(self, about: str | None = None) -> str:
        """The table in Markdown under a title; ``about``: a line under the title (model, machine).
        The table has the noise columns (:meth:`_rows`) when the metrics have intervals, and a
        second table under it has the accuracy per question type when the questions have types."""

        def block(header: list[str], rows: list[list[str]]) -> str:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

        header, rows = self._rows(noise=True)
        body = block(header, rows)
        if self._NOISE_COLUMNS[0] in header:
            body += (
                f"\n\n±: half-width of the {BOOTSTRAP_LEVEL:.0%} bootstrap interval of the accuracy "
                f"({BOOTSTRAP_RESAMPLES} resamples of the questions, seed {BOOTSTRAP_SEED}). Δ acc: accuracy minus "
                "vanilla's, with its paired bootstrap interval (the same resamples). only plan/vanilla right: "
                "questions answered right under the plan but not vanilla / under vanilla but not the plan."
            )
        typed = self._type_rows()
        if typed is not None:
            body += "\n\nAccuracy by question type:\n\n" + block(*typed)
        task = self.task
        head = f"# Evaluation: {task.get('name')} ({task.get('split')}, {task.get('n')} questions, seed {task.get('seed')})\n\n"
        if about:
            head += about + "\n\n"
        notes = "".join(f"\n- {n}" for n in self.notes)
        return head + body + ("\n\nNotes:" + notes if notes else "") + "\n"


class _Accountant:
    """Per-sample FLOP/KV accounting, cached by (plan, n_visual, n_text, visual per layer)."""

    def __init__(self, config, notes: list[str], kv_dtype_bytes: int):
        self.config = config
        self.notes = notes
        self.kv_dtype_bytes = kv_dtype_bytes
        self.cache: dict[Any, Any] = {}
        try:
            from tokenreduce.measure.flops import account
        except ImportError as exc:
            self.account = None
            notes.append(f"FLOP accounting unavailable ({exc}); FLOP columns are n/a")
        else:
            self.account = account

    def __call__(self, name: str, plan, n_visual: int, n_text: int, trace, sample: int, per_layer: list[int]):
        if self.account is None:
            return None
        key = (name, n_visual, n_text, tuple(per_layer))
        if key not in self.cache:
            try:
                self.cache[key] = self.account(
                    self.config,
                    plan=plan,
                    n_visual=n_visual,
                    n_text=n_text,
                    trace=trace,
                    sample=sample,
                    kv_dtype_bytes=self.kv_dtype_bytes,
                ).to_dict()
            except Exception as exc:  # noqa: BLE001 - accuracy stays valid without FLOPs
                note = f"FLOP accounting failed: {type(exc).__name__}: {exc}"
                if note not in self.notes:
                    self.notes.append(note)
                self.cache[key] = None
        return self.cache[key]


class _Batches:
    """The evaluation batches' processed inputs and token counts, computed once and shared by
    every configuration (up to ``cache_inputs_mib``; batches beyond it are processed again each
    time).  Preprocessing is not part of any configuration's time."""

    def __init__(self, loaded, examples: list[Example], settings: EvalSettings, template: str, question_format: str):
        self.loaded, self.settings = loaded, settings
        self.template, self.question_format = template, question_format
        self.starts = list(range(0, len(examples), settings.batch_size))
        self.examples = examples
        self.cache: dict[int, tuple[dict, list[int], list[int]]] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.starts)

    def get_examples(self, i: int) -> list[Example]:
        """The questions of batch ``i``."""
        start = self.starts[i]
        return self.examples[start : start + self.settings.batch_size]

    def get(self, i: int) -> tuple[list[Example], dict, list[int], list[int]]:
        from .latency import count_tokens

        batch = self.get_examples(i)
        if i in self.cache:
            return (batch, *self.cache[i])
        prompts = [format_prompt(self.template, ex.question, self.question_format) for ex in batch]
        inputs = self.loaded.processor_inputs(prompts, [ex.image() for ex in batch])
        n_vis, n_txt = count_tokens(self.loaded.model, inputs)
        size = sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
        if self.cached_bytes + size <= self.settings.cache_inputs_mib * 2**20:
            self.cache[i] = (inputs, n_vis, n_txt)
            self.cached_bytes += size
        return batch, inputs, n_vis, n_txt


def _generate(
    loaded,
    batches: _Batches,
    indices: list[int],
    compiled,
    name: str,
    settings: EvalSettings,
    accountant: _Accountant,
    bar,
) -> PlanOutputs:
    """Generate with one configuration on the batches ``indices`` (of ``batches``)."""
    model = loaded.model
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    pad = gen_cfg.pad_token_id
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    outputs = PlanOutputs(name)
    for i in indices:
        batch, inputs, n_vis, n_txt = batches.get(i)
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        if pad is None and eos is not None:
            kwargs["pad_token_id"] = eos if isinstance(eos, int) else eos[0]
        t0 = time.perf_counter()
        with torch.no_grad():
            if compiled is None:
                out, trace = model.generate(**inputs, **kwargs), None
            else:
                adapter, plan = compiled
                with adapter.attach(model, plan) as att:
                    out = model.generate(**inputs, **kwargs)
                trace = att.trace
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        outputs.seconds += time.perf_counter() - t0
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        trimmed = fidelity.trim_at_eos(generated, eos, pad)
        outputs.tokens += trimmed
        outputs.answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in trimmed]
        outputs.batch_logits.append(out.logits[0].float().cpu())
        clamped = [0] * len(batch)
        if trace is not None:
            outputs.stage_layers = [st.layer for st in trace.stages]
            outputs.select_seconds += sum(st.seconds for st in trace.stages)
            for _, b in trace.clamped():
                clamped[b] += 1
        for b in range(len(batch)):
            per_layer = trace.visual_per_layer(b) if trace is not None else [n_vis[b]] * loaded.n_layers
            outputs.doc_ids.append(batches.starts[i] + b)
            outputs.n_visual.append(n_vis[b])
            outputs.n_text.append(n_txt[b])
            outputs.visual_per_layer.append(per_layer)
            outputs.kept_per_stage.append([st.visual_after[b] for st in trace.stages] if trace is not None else [])
            outputs.clamped.append(clamped[b])
            plan_obj = compiled[1].plan if compiled is not None else None
            outputs.accounting.append(accountant(name, plan_obj, n_vis[b], n_txt[b], trace, b, per_layer))
        bar.update(len(batch))
    return outputs


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def evaluate(
    loaded,
    examples: list[Example],
    plans: Mapping[str, Any],
    settings: EvalSettings | None = None,
    *,
    template: str,
    question_format: str = "{question}",
    task_info: Mapping[str, Any] | None = None,
    progress_factory: Callable[..., Any] | None = None,
) -> EvalResult:
    """Evaluate vanilla and then every plan on ``examples``: :func:`measure` on every batch, then
    :func:`summarize`.

    Args:
        loaded: a :class:`tokenreduce.models.LoadedModel` with a processor.
        examples: from :func:`load_task`.
        plans: display name -> plan (Plan, dict or preset name); all validated before any run.
        settings: :class:`EvalSettings`.
        template: the model's prompt template (image placeholder and ``{question}``).
        question_format: the task's question format.
        task_info: written into the result (name, split, n, seed).

    Returns:
        an :class:`EvalResult` whose ``metrics`` has one dict per configuration with keys
        ``name, accuracy, retention, first_token_agreement, exact_match, first_token_kl,
        flops_true, flops_paper, tflops_true, tflops_paper, kv_bytes, kv_mib, layer_average,
        seconds, ms_per_example, select_seconds, flop_ratio``, the noise levels of
        :func:`bootstrap_noise` (``accuracy_ci``; for plans ``accuracy_diff``, ``accuracy_diff_ci``,
        ``only_plan_correct``, ``only_vanilla_correct``) and, when the questions have types,
        ``accuracy_by_type``.
    """
    settings = settings or EvalSettings()
    records = measure(
        loaded,
        examples,
        plans,
        settings,
        template=template,
        question_format=question_format,
        progress_factory=progress_factory,
    )
    return summarize(records, settings, task_info)


def batch_count(n_examples: int, settings: EvalSettings) -> int:
    """The number of evaluation batches of ``n_examples`` questions (the units a sharded run splits)."""
    return -(-n_examples // settings.batch_size)


def measure(
    loaded,
    examples: list[Example],
    plans: Mapping[str, Any],
    settings: EvalSettings | None = None,
    *,
    template: str,
    question_format: str = "{question}",
    progress_factory: Callable[..., Any] | None = None,
    batches: list[int] | None = None,
) -> EvalRecords:
    """Generate with vanilla and then every plan on the batches ``batches`` of ``examples``
    (batch ``b``: questions ``b * batch_size`` .. ``(b + 1) * batch_size - 1``; ``None``: all),
    and return the per-question records (:class:`EvalRecords`).  The batches are those of a
    single run whatever subset is asked for, so a shard computes what one process computes."""
    import tokenreduce

    if not examples:
        raise TokenReduceError("evaluate: no examples")
    if VANILLA in plans:
        raise TokenReduceError(f"{VANILLA!r} is reserved for the unreduced model; rename that plan")
    settings = settings or EvalSettings()
    compiled = {name: tokenreduce.compile_for(loaded.model, plan) for name, plan in plans.items()}
    notes: list[str] = []
    accountant = _Accountant(loaded.model.config, notes, kv_dtype_bytes=loaded.dtype.itemsize)
    names = [VANILLA, *plans]
    runs: dict[str, PlanOutputs] = {}
    data = _Batches(loaded, examples, settings, template, question_format)
    indices = list(range(len(data))) if batches is None else list(batches)
    if any(not 0 <= i < len(data) for i in indices) or len(set(indices)) != len(indices):
        raise TokenReduceError(f"measure: batches {indices} must be distinct numbers in 0 .. {len(data) - 1}")
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    total = sum(len(data.get_examples(i)) for i in indices) * len(names)
    if progress_factory is None:  # a bar on a terminal, one line per configuration elsewhere
        bar = progress_bar(total, "eval", enabled=settings.progress)
    else:
        bar = progress_factory(total=total, desc="eval", disable=not settings.progress, leave=False)
    try:
        if settings.warmup and indices:  # the first generate() pays one-off costs that would be charged to vanilla
            _, first, _, _ = data.get(indices[0])
            with torch.no_grad():
                loaded.model.generate(**first, max_new_tokens=1, do_sample=False)
        for name in names:
            bar.set_postfix_str(name)
            runs[name] = _generate(loaded, data, indices, compiled.get(name), name, settings, accountant, bar)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    return EvalRecords(
        n_examples=len(examples),
        names=names,
        plans={
            name: compiled[name][1].plan.model_dump(mode="json", exclude_defaults=True) if name in compiled else None
            for name in names
        },
        records={name: _records(examples, runs[VANILLA], runs[name]) for name in names},
        seconds={name: runs[name].seconds for name in names},
        select_seconds={name: runs[name].select_seconds for name in names},
        notes=notes,
    )


def _records(examples: list[Example], base: PlanOutputs, run: PlanOutputs) -> list[dict[str, Any]]:
    """One record per question of ``run`` (keys: :class:`EvalRecords`), against vanilla's ``base``;
    the first-token KL is computed batch by batch, on the batches' own logits."""
    kls: list[float] = []
    for vanilla_logits, logits in zip(base.batch_logits, run.batch_logits):
        kls += fidelity.first_token_kl(vanilla_logits, logits, reduction="none").tolist()
    records = []
    for j, doc in enumerate(run.doc_ids):
        ex = examples[doc]
        per_layer = run.visual_per_layer[j]
        accounting = run.accounting[j] or {}
        records.append(
            {
                "doc_id": doc,
                "question_id": ex.index,
                "image_id": ex.image_id,
                "question": ex.question,
                "answer": ex.answer,
                "prediction": run.answers[j],
                "correct": fidelity.accuracy([run.answers[j]], [ex.answer]) == 1.0,
                "first_token_agree": fidelity.first_token_agreement([base.tokens[j]], [run.tokens[j]]) == 1.0,
                "first_token_kl": kls[j] if math.isfinite(kls[j]) else None,
                "stage_layers": list(run.stage_layers),
                "kept_per_stage": run.kept_per_stage[j],
                "visual_tokens": run.n_visual[j],
                "layer_average": sum(per_layer) / len(per_layer),
                "exact_match": fidelity.exact_match([base.tokens[j]], [run.tokens[j]]) == 1.0,
                "text_tokens": run.n_text[j],
                "flops_true": accounting.get("flops_true"),
                "flops_paper": accounting.get("flops_paper"),
                "kv_bytes": accounting.get("kv_bytes"),
                "clamped_stages": run.clamped[j],
                "qtype": ex.qtype,
            }
        )
    return records


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _percentile_interval(values: torch.Tensor, level: float = BOOTSTRAP_LEVEL) -> torch.Tensor:
    """``[K, 2]``: per row of ``values`` (``[K, B]`` bootstrap estimates) the percentile interval of
    ``level``: the order statistics ``floor(a (B - 1))`` and ``ceil((1 - a) (B - 1))`` with
    ``a = (1 - level) / 2`` (no interpolation, so the ends are estimates that occurred)."""
    ordered = values.sort(dim=1).values
    last = values.shape[1] - 1
    tail = (1.0 - level) / 2
    lo, hi = math.floor(tail * last + 1e-9), math.ceil((1.0 - tail) * last - 1e-9)
    return torch.stack([ordered[:, lo], ordered[:, hi]], dim=1)


def bootstrap_noise(
    correct: Mapping[str, list[bool]],
    base: str = VANILLA,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, dict[str, Any]]:
    """Noise levels of the accuracies of several configurations on the same questions.

    The questions are resampled with replacement ``resamples`` times (``torch.randint`` with a
    generator seeded with ``seed``; the same resamples for every configuration, which makes the
    differences paired), each resample's accuracy is computed for every configuration at once (a
    ``[resamples, n] @ [n, K]`` product of counts, exact in float64), and the intervals are the
    percentile intervals of ``level`` (:func:`_percentile_interval`).

    Args:
        correct: configuration name -> per-question correctness, every list in the same question order.
        base: the configuration the others are compared with (vanilla).

    Returns:
        name -> ``accuracy_ci`` (``[low, high]``) and, for every name but ``base``,
        ``accuracy_diff`` (accuracy minus ``base``'s), ``accuracy_diff_ci`` (its paired interval),
        ``only_plan_correct`` and ``only_vanilla_correct`` (questions right under this
        configuration but not ``base``, and the reverse).

    Raises:
        TokenReduceError: no questions, lists of different lengths, ``base`` missing, ``resamples``
            below 1 or ``level`` outside (0, 1).
    """
    names = list(correct)
    if base not in correct:
        raise TokenReduceError(f"bootstrap_noise: the base configuration {base!r} is not among {names}")
    n = len(correct[base])
    if n == 0 or any(len(correct[name]) != n for name in names):
        lengths = {name: len(correct[name]) for name in names}
        raise TokenReduceError(f"bootstrap_noise: every configuration needs the same n >= 1 questions, got {lengths}")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise TokenReduceError(
            f"bootstrap_noise: resamples={resamples} must be >= 1 and level={level} strictly between 0 and 1"
        )
    flags = torch.tensor([[bool(c) for c in correct[name]] for name in names], dtype=torch.float64)  # [K, n]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(resamples, n, dtype=torch.float64)
    )
    boot = (counts @ flags.T).T / n  # [K, B]: every resample's accuracy of every configuration
    acc_ci = _percentile_interval(boot, level)
    b = names.index(base)
    diff_ci = _percentile_interval((counts @ (flags - flags[b]).T).T / n, level)  # exact: counts of -1, 0, 1
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        entry: dict[str, Any] = {"accuracy_ci": acc_ci[k].tolist()}
        if name != base:
            plan, vanilla = flags[k].bool(), flags[b].bool()
            entry["accuracy_diff"] = (int(plan.sum()) - int(vanilla.sum())) / n
            entry["accuracy_diff_ci"] = diff_ci[k].tolist()
            entry["only_plan_correct"] = int((plan & ~vanilla).sum())
            entry["only_vanilla_correct"] = int((vanilla & ~plan).sum())
        out[name] = entry
    return out


def _accuracy_by_type(records: list[dict[str, Any]]) -> dict[str, dict[str, float | int]] | None:
    """Question type -> ``{"accuracy", "n"}`` (types sorted by name), or ``None`` when the
    questions carry no type (the format of :func:`tokenreduce.reference.scenes.accuracy_by_type`)."""
    tally: dict[str, list[int]] = {}
    for r in records:
        qtype = r.get("qtype")
        if qtype is not None:
            t = tally.setdefault(qtype, [0, 0])
            t[0] += int(bool(r["correct"]))
            t[1] += 1
    if not tally:
        return None
    return {typ: {"accuracy": tally[typ][0] / tally[typ][1], "n": tally[typ][1]} for typ in sorted(tally)}


def summarize(
    records: EvalRecords, settings: EvalSettings | None = None, task_info: Mapping[str, Any] | None = None
) -> EvalResult:
    """The table of complete records (every question of the subset, as :func:`measure` on all
    batches or :meth:`EvalRecords.merge` of every shard gives): per configuration the means of
    its per-question numbers, in question order, so the same records give the same floats."""
    settings = settings or EvalSettings()
    n = records.n_examples
    for name in records.names:
        if [r["doc_id"] for r in records.records[name]] != list(range(n)):
            raise TokenReduceError(f"summarize: configuration {name!r} does not have one record per question")
    notes = list(records.notes)
    base_acc = _share([r["correct"] for r in records.records[VANILLA]])
    noise = bootstrap_noise({name: [r["correct"] for r in records.records[name]] for name in records.names})
    metrics = []
    for name in records.names:
        recs = records.records[name]
        acc = _share([r["correct"] for r in recs])
        kls = [r["first_token_kl"] for r in recs]
        kl = float(torch.tensor(kls, dtype=torch.float64).mean()) if None not in kls else None
        flops_true = _mean([r["flops_true"] for r in recs])
        flops_paper = _mean([r["flops_paper"] for r in recs])
        kv = _mean([r["kv_bytes"] for r in recs])
        clamped = [r["clamped_stages"] for r in recs]
        metrics.append(
            {
                "name": name,
                "plan": records.plans[name],
                "accuracy": acc,
                "retention": fidelity.retention(acc, base_acc),
                "first_token_agreement": _share([r["first_token_agree"] for r in recs]),
                "exact_match": _share([r["exact_match"] for r in recs]),
                "first_token_kl": kl,
                "flops_true": flops_true,
                "flops_paper": flops_paper,
                "tflops_true": flops_true / 1e12 if flops_true is not None else None,
                "tflops_paper": flops_paper / 1e12 if flops_paper is not None else None,
                "kv_bytes": kv,
                "kv_mib": kv / 2**20 if kv is not None else None,
                "layer_average": sum(r["layer_average"] for r in recs) / n,
                "n_visual_mean": sum(r["visual_tokens"] for r in recs) / n,
                "n_text_mean": sum(r["text_tokens"] for r in recs) / n,
                "seconds": records.seconds[name],
                "ms_per_example": 1e3 * records.seconds[name] / n,
                "select_seconds": records.select_seconds[name],
                "clamped_samples": sum(c > 0 for c in clamped),
                "clamped_stages": sum(clamped),
                **noise[name],
            }
        )
        by_type = _accuracy_by_type(recs)
        if by_type is not None:
            metrics[-1]["accuracy_by_type"] = by_type
    vanilla_flops = metrics[0]["flops_true"]
    for m in metrics:
        m["flop_ratio"] = vanilla_flops / m["flops_true"] if vanilla_flops and m["flops_true"] else None
        if m["clamped_samples"]:
            notes.append(
                f"{m['name']}: the keep count was clamped for {m['clamped_samples']} example(s) "
                f"({m['clamped_stages']} stage cut(s)): the plan asked for more visual tokens than a stage had, "
                "or for fewer than 1 (Clamps in docs/concepts.md)"
            )
    if base_acc == 0:
        notes.append("vanilla accuracy is 0 (e.g. random weights): retention is undefined")
    per_example = []
    for i, rec in enumerate(records.records[VANILLA]):
        row = {
            "index": rec["question_id"],
            "image_id": rec["image_id"],
            "question": rec["question"],
            "gold": rec["answer"],
        }
        if settings.keep_answers:
            row["answers"] = {name: records.records[name][i]["prediction"] for name in records.names}
        per_example.append(row)
    samples = (
        {name: [_sample(r) for r in records.records[name]] for name in records.names} if settings.log_samples else {}
    )
    return EvalResult(task=dict(task_info or {}), metrics=metrics, examples=per_example, notes=notes, samples=samples)


def _sample(record: Mapping[str, Any]) -> dict[str, Any]:
    """The per-sample log line of a record: :data:`SAMPLE_KEYS`, plus ``qtype`` when the question has a type."""
    sample = {k: record[k] for k in SAMPLE_KEYS}
    if record.get("qtype") is not None:
        sample["qtype"] = record["qtype"]
    return sample
