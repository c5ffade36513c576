"""Latency benchmark: vanilla against each plan on the same model and inputs.

For every configuration (``vanilla`` = no plan, then each plan) and every timed repeat, one greedy
``generate()`` of exactly ``max_new_tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``),
so every plan's stages run once per timed run:

* **prefill**: from the first forward of the model or of one of its parts in ``generate()``
  (forward pre-hooks, registered ahead of the attachment's own; ``generate()`` of transformers
  >= 5 runs the vision tower before the model's forward) to the end of the first step's forward (a
  logits processor stamps the clock after each step's forward): image encoding and the prompt's
  forward with the KV cache, the plan's stages included;
* **TTFT**: first stamp - start of the call (prefill plus ``generate``'s own set-up);
  **decode**: (last stamp - first stamp) / (steps - 1) per token; **end-to-end**: the whole call;
* **stages**: the time the plan's stages spent scoring and selecting in that prefill (the sum of
  ``trace.stages[i].seconds``; host clock), part of the prefill time;
* **peak memory** during the ``generate``: on CUDA ``torch.cuda.max_memory_allocated()`` minus
  the memory allocated before (activations, KV cache, temporaries); on a Linux CPU the peak
  resident set size minus the resident set size before (``/proc/self/status`` ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``).  CPU numbers include allocator effects (memory
  freed earlier and reused is not counted again) and are coarse; where the reset is not
  permitted the peak is reported as ``None`` ("n/a").

``BenchSettings.prefill`` (default off) adds a separate plain prefill forward before each
``generate()`` (``separate_prefill_s``): a cross-check of the in-``generate`` prefill, at the cost
of running the stages twice per run.

Warm-up runs are done and discarded first; configurations are interleaved within each repeat
(vanilla, plan 1, plan 2, vanilla, ...) so machine noise hits them alike.  Each statistic is the
median with min/max and the interquartile range over the repeats.  CUDA work is synchronised
before every clock reading.

Each plan's prefill speed-up sits beside two **FLOP-ratio limits** from
:func:`tokenreduce.measure.flops.account` (true FLOPs, 2 per multiply-add, vision tower included,
with the visual counts the trace recorded): vanilla prefill FLOPs over the plan's with the stages'
own FLOPs (scorers, selectors; the true convention) and without them (the model at the reduced
counts only).  ``speed-up / limit`` says how much of the reachable gain was measured.

With ``BenchSettings.compose_layers`` = L, :func:`compose` also estimates the prefill of the same
model with L decoder layers (e.g. all 32 of LLaVA-1.5-7B when only a few fit in memory) from
measured parts: one decoder layer's forward time at each token count, the fixed parts, and the
stages' measured time (see :func:`compose` for the method and its assumptions).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .progress import progress_bar

__all__ = [
    "BenchSettings",
    "Stat",
    "ConfigResult",
    "BenchResult",
    "summarize",
    "PeakMemory",
    "time_prefill",
    "time_generate",
    "time_layer",
    "benchmark",
    "compose",
    "ComposeResult",
    "format_table",
    "format_si",
]

VANILLA = "vanilla"


class BenchSettings(BaseModel):
    """The ``bench`` section of the config (``tokenreduce bench bench.repeats=5 ...``)."""

    model_config = ConfigDict(extra="forbid")

    warmup: int = Field(default=1, ge=0, description="untimed runs of every configuration first")
    repeats: int = Field(default=3, ge=1, description="timed runs of every configuration")
    max_new_tokens: int = Field(default=8, ge=2, description="tokens per generate() (>= 2 for decode ms/token)")
    batch_size: int = Field(default=1, ge=1, description="samples per forward")
    prefill: bool = Field(
        default=False,
        description="also time a separate plain prefill forward before each generate() (a cross-check; "
        "the stages then run twice per run). The prefill column always comes from inside generate()",
    )
    compose_layers: int | None = Field(
        default=None,
        ge=1,
        description="also estimate the prefill with this many decoder layers (e.g. 32), composed from one "
        "layer's measured time at each token count, the fixed parts and the stages' time (null: off)",
    )
    n_visual: int | None = Field(
        default=None, ge=1, description="synthetic inputs: visual tokens (default model.n_visual)"
    )
    n_text: int | None = Field(
        default=None, ge=1, description="synthetic inputs: text tokens (default model.n_text or 60)"
    )
    synthetic: bool | None = Field(
        default=None, description="random inputs instead of the processor (default: when the model has no processor)"
    )
    question: str = Field(
        default="what color is the shape?",
        description="processor inputs: the question put in the model's prompt template",
    )
    image: str | None = Field(
        default=None, description="processor inputs: an image file (default: a synthetic picture)"
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch.set_num_threads for the run (default: leave as is)"
    )
    progress: bool = Field(default=True, description="progress on stderr: a bar on a terminal, else one line per run")
    seed: int = Field(default=0, description="seed of the synthetic inputs and pictures")


@dataclass
class Stat:
    """Summary of repeated measurements (seconds unless named otherwise)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    values: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
            "values": self.values,
        }


def summarize(values: list[float]) -> Stat:
    """Median, min, max and quartiles (``statistics.quantiles``, inclusive method) of >= 1 values."""
    if not values:
        raise ValueError("summarize: no values")
    vals = [float(v) for v in values]
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Stat(statistics.median(vals), min(vals), max(vals), q1, q3, vals)


@dataclass
class ConfigResult:
    """Everything measured for one configuration (vanilla or a plan).

    ``prefill_s`` is timed inside ``generate()`` (module docstring); ``separate_prefill_s`` is the
    optional plain prefill forward (``BenchSettings.prefill``).  ``stages_s`` is the stages' own
    time per run (part of the prefill).  ``flop_ratio_limit`` is vanilla prefill FLOPs / the
    plan's with the stages' FLOPs, ``flop_ratio_limit_no_stages`` without them;
    ``limit_fraction`` holds prefill speed-up / each limit (keys ``with_stages``,
    ``without_stages``).
    """

    name: str
    plan: dict[str, Any] | None
    prefill_s: Stat
    ttft_s: Stat
    decode_s_per_token: Stat
    e2e_s: Stat
    stages_s: Stat
    peak_memory_bytes: Stat | None
    visual_per_layer: list[int]
    layer_average: float
    separate_prefill_s: Stat | None = None
    accounting: dict[str, Any] | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    flop_ratio_limit: float | None = None
    flop_ratio_limit_no_stages: float | None = None
    limit_fraction: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        stat = lambda s: s.to_dict() if s is not None else None  # noqa: E731
        return {
            "name": self.name,
            "plan": self.plan,
            "prefill_s": stat(self.prefill_s),
            "separate_prefill_s": stat(self.separate_prefill_s),
            "ttft_s": stat(self.ttft_s),
            "decode_s_per_token": stat(self.decode_s_per_token),
            "e2e_s": stat(self.e2e_s),
            "stages_s": stat(self.stages_s),
            "peak_memory_bytes": stat(self.peak_memory_bytes),
            "visual_per_layer": self.visual_per_layer,
            "layer_average": self.layer_average,
            "speedup": self.speedup,
            "flop_ratio_limit": self.flop_ratio_limit,
            "flop_ratio_limit_no_stages": self.flop_ratio_limit_no_stages,
            "limit_fraction": self.limit_fraction,
            "accounting": self.accounting,
        }


@dataclass
class BenchResult:
    """The benchmark of vanilla and every plan on one model and input batch (``compose``: the
    composed estimate at ``BenchSettings.compose_layers`` decoder layers, or None)."""

    configs: list[ConfigResult]
    settings: dict[str, Any]
    inputs: dict[str, Any]
    memory_method: str
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    compose: ComposeResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "inputs": self.inputs,
            "memory_method": self.memory_method,
            "environment": self.environment,
            "notes": self.notes,
            "configs": [c.to_dict() for c in self.configs],
            "compose": self.compose.to_dict() if self.compose is not None else None,
        }

    def table(self) -> str:
        """A plain-text table: medians with [min-max]; the prefill speed-up beside both FLOP-ratio
        limits and the fraction of each it reached (legend: :data:`TABLE_LEGEND`)."""
        header = [
            "config",
            "layer avg",
            "prefill ms",
            "stages ms",
            "TTFT ms",
            "decode ms/tok",
            "e2e ms",
            "peak MiB",
            "prefill x",
            "e2e x",
            "FLOP limit x",
            "x/limit",
            "no-stage limit x",
            "x/no-stage limit",
        ]
        if any(c.separate_prefill_s is not None for c in self.configs):
            header.insert(3, "sep. prefill ms")
        rows = []
        for c in self.configs:
            row = [
                c.name,
                f"{c.layer_average:.1f}",
                _fmt_stat(c.prefill_s, 1e3),
                f"{c.stages_s.median * 1e3:.1f}",
                _fmt_stat(c.ttft_s, 1e3),
                _fmt_stat(c.decode_s_per_token, 1e3),
                _fmt_stat(c.e2e_s, 1e3),
                f"{c.peak_memory_bytes.median / 2**20:.0f}" if c.peak_memory_bytes is not None else "n/a",
                _fmt_x(c.speedup.get("prefill")),
                _fmt_x(c.speedup.get("e2e")),
                _fmt_x(c.flop_ratio_limit),
                _fmt_x(c.limit_fraction.get("with_stages")),
                _fmt_x(c.flop_ratio_limit_no_stages),
                _fmt_x(c.limit_fraction.get("without_stages")),
            ]
            if "sep. prefill ms" in header:
                row.insert(3, _fmt_stat(c.separate_prefill_s, 1e3))
            rows.append(row)
        return format_table(rows, header)


#: what the columns of :meth:`BenchResult.table` mean (printed by ``tokenreduce bench``)
TABLE_LEGEND = (
    "prefill = image encoding + first forward inside generate() (stages included); stages = the stages' own time; "
    "x = vanilla median / plan median; FLOP limit x = vanilla prefill FLOPs / plan prefill FLOPs with the stages' "
    "FLOPs (true convention); no-stage limit x = the same without the stages' FLOPs (the model at the reduced "
    "counts only); x/limit = prefill x / FLOP limit x; x/no-stage limit = prefill x / no-stage limit x"
)


def _fmt_stat(s: Stat | None, scale: float) -> str:
    if s is None:
        return "-"
    return f"{s.median * scale:.1f} [{s.min * scale:.1f}-{s.max * scale:.1f}]"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_si(value: float | None, digits: int = 4) -> str:
    """``8.45e12`` -> ``"8.450T"``; ``1.2e7`` -> ``"12.00M"`` (``digits`` significant digits; ``-`` for None)."""
    if value is None:
        return "-"
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# -- clocks and memory ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status() -> dict[str, int] | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    out = {}
    for key in ("VmHWM", "VmRSS"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m is None:
            return None
        out[key] = int(m.group(1)) * 1024
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory while the ``with`` block runs (see the module docstring).

    After the block, ``peak_bytes`` is an int, or ``None`` where it cannot be measured.
    ``method`` says how it was measured.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        if self.device.type == "cuda":
            self.method = "cuda: torch.cuda.max_memory_allocated() - memory_allocated() before"
        elif _read_status() is not None and _reset_peak_rss():
            self.method = "cpu: peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before; coarse"
        else:
            self.method = "n/a: no CUDA and no resettable peak RSS on this system"

    def __enter__(self) -> PeakMemory:
        self._base = None
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("cpu") and _reset_peak_rss():
            status = _read_status()
            self._base = status["VmRSS"] if status else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            status = _read_status()
            if status is not None:
                self.peak_bytes = max(0, status["VmHWM"] - self._base)


def time_prefill(model: Any, inputs: Mapping[str, Any], device: torch.device) -> float:
    """Seconds of one prefill forward with the KV cache on (logits of the last position only)."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - t0


@dataclass
class GenerateTiming:
    """One timed ``generate()`` (seconds): ``prefill_s`` = its first model forward,
    ``ttft_s`` = start of the call to the first token's logits."""

    prefill_s: float
    ttft_s: float
    decode_s_per_token: float
    e2e_s: float
    steps: int
    sequences: Any


def time_generate(model: Any, inputs: Mapping[str, Any], max_new_tokens: int, device: torch.device) -> GenerateTiming:
    """Greedy ``generate()`` of exactly ``max_new_tokens`` tokens, timed per step (see module doc).

    The prefill is timed from the first forward pre-hook to fire, on ``model`` or on one of the
    direct parts of its base model (``generate()`` of transformers >= 5 encodes the images with
    the vision tower before it calls the model's forward), to the first logits-processor stamp.
    The hooks are prepended, so they run before any attachment's own."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []
    starts: list[float] = []

    class _StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    def _forward_start(module, args):
        if not starts:
            _sync(device)
            starts.append(time.perf_counter())

    handles = [m.register_forward_pre_hook(_forward_start, prepend=True) for m in _prefill_modules(model)]
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([_StepClock()]),
            )
            _sync(device)
            t1 = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
    if len(stamps) < 2:
        raise RuntimeError(f"generate() ran {len(stamps)} step(s); decode timing needs >= 2 (max_new_tokens >= 2)")
    if not starts:
        raise RuntimeError(
            f"generate() called neither {type(model).__name__}'s forward nor its parts' through the modules (no "
            "forward pre-hook fired), so its prefill cannot be timed"
        )
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return GenerateTiming(stamps[0] - starts[0], stamps[0] - t0, decode, t1 - t0, len(stamps), out)


def _prefill_modules(model: Any) -> list[Any]:
    """``model`` and the direct parts of its base model (vision tower, projector, language model...):
    the first of them to run starts a ``generate()``'s prefill."""
    base = getattr(model, "base_model", model)
    return [model] + ([] if base is model else [base]) + list(base.children())


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the benchmark ------------------------------------------------------------------------------
def _image_token_id(config) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    return None


def count_tokens(model: Any, inputs: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Per sample: (visual tokens, text tokens) of a processor/synthetic batch (``input_ids`` equal
    to the config's image token id are visual; the other valid positions are text)."""
    ids = inputs["input_ids"]
    valid = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    token = _image_token_id(model.config)
    visual = ((ids == token) & valid).sum(-1) if token is not None else torch.zeros(ids.shape[0], dtype=torch.long)
    return visual.tolist(), (valid.sum(-1) - visual).tolist()


def _accounting(model, plan, n_visual: int, n_text: int, trace, notes: list[str]) -> dict[str, Any] | None:
    try:
        from tokenreduce.measure.flops import account
    except ImportError as exc:
        _note(notes, f"FLOP accounting unavailable ({exc}); FLOP-ratio limits are n/a")
        return None
    try:
        kv_bytes = next(model.parameters()).dtype.itemsize
        return account(
            model.config, plan=plan, n_visual=n_visual, n_text=n_text, trace=trace, kv_dtype_bytes=kv_bytes
        ).to_dict()
    except Exception as exc:  # noqa: BLE001 - the benchmark's timings stay valid without FLOPs
        _note(notes, f"FLOP accounting failed for {model.config.model_type}: {type(exc).__name__}: {exc}")
        return None


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def benchmark(
    model: Any,
    inputs: Mapping[str, Any],
    plans: Mapping[str, Any],
    settings: BenchSettings | None = None,
    *,
    vanilla: bool = True,
    progress_factory: Callable[..., Any] | None = None,
) -> BenchResult:
    """Time vanilla and every plan on ``model`` with one input batch.

    Args:
        model: a Hugging Face VLM supported by a registered adapter (eval mode).
        inputs: the model's inputs on its device (``input_ids`` ``[B, S]``, ``attention_mask``,
            ``pixel_values``, ...), e.g. from :meth:`tokenreduce.models.LoadedModel.synthetic_inputs`.
        plans: display name -> plan (a :class:`~tokenreduce.core.plan.Plan`, dict or preset
            name); every plan is validated against the model before anything is timed.
        settings: :class:`BenchSettings` (warm-up, repeats, tokens, threads, progress).
        vanilla: include the unreduced model (the reference of the speed-ups).
        progress_factory: ``tqdm``-like callable (``total=``, ``desc=``, ``disable=``); default
            :func:`tokenreduce.measure.progress.progress_bar` (a bar on a terminal, else a line per run).

    Returns:
        a :class:`BenchResult`; ``speedup`` of a plan is vanilla median / plan median per metric
        (``prefill``, ``ttft``, ``decode``, ``e2e``) when vanilla is included.
    """
    import tokenreduce

    settings = settings or BenchSettings()
    device = next(model.parameters()).device
    compiled = {name: tokenreduce.compile_for(model, plan) for name, plan in plans.items()}  # validate first
    names = ([VANILLA] if vanilla else []) + list(plans)
    if not names:
        raise ValueError("benchmark: nothing to time (no plans and vanilla=False)")
    if VANILLA in plans and (vanilla or settings.compose_layers is not None):
        raise ValueError(f"benchmark: {VANILLA!r} is reserved for the unreduced model; rename that plan")
    if settings.compose_layers is not None:  # fail before anything is timed
        _decoder_adapter(model)
        _plans_at_depth(compiled, settings.compose_layers)
    n_visual, n_text = count_tokens(model, inputs)
    notes: list[str] = []
    if len(set(n_visual)) > 1 or len(set(n_text)) > 1:
        _note(notes, f"samples differ in length (visual {n_visual}, text {n_text}); FLOPs use sample 0")

    records: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in ("prefill", "separate_prefill", "ttft", "decode", "e2e", "stages", "peak")} for n in names
    }
    traces: dict[str, Any] = {}
    mem_method = PeakMemory(device).method
    total = (settings.warmup + settings.repeats) * len(names)
    if progress_factory is None:  # a bar on a terminal, one line per run elsewhere (tokenreduce.measure.progress)
        bar = progress_bar(total, "bench", enabled=settings.progress)
    else:
        bar = progress_factory(total=total, desc="bench", disable=not settings.progress, leave=False)
    try:
        with _threads(settings.threads):
            for rep in range(settings.warmup + settings.repeats):
                timed = rep >= settings.warmup
                for name in names:
                    bar.set_postfix_str(
                        f"{name} {'run' if timed else 'warm-up'} {rep + 1 - (settings.warmup if timed else 0)}"
                    )
                    rec = _one_run(model, inputs, compiled.get(name), settings, device)
                    if timed:
                        for key, value in rec.items():
                            if key != "trace":
                                records[name][key].append(value)
                    traces[name] = rec["trace"]
                    bar.update(1)
    finally:
        bar.close()

    depth = None
    configs = []
    for name in names:
        r = records[name]
        trace = traces[name]
        plan_obj = compiled[name][1].plan if name in compiled else None
        if trace is not None:
            per_layer = trace.visual_per_layer(0)
            depth = trace.n_layers
        else:
            depth = depth or _num_layers(model)
            per_layer = [n_visual[0]] * depth
        peak = None if any(v is None for v in r["peak"]) else summarize([float(v) for v in r["peak"]])
        cfg = ConfigResult(
            name=name,
            plan=plan_obj.model_dump(mode="json", exclude_defaults=True) if plan_obj is not None else None,
            prefill_s=summarize(r["prefill"]),
            separate_prefill_s=summarize(r["separate_prefill"]) if settings.prefill else None,
            ttft_s=summarize(r["ttft"]),
            decode_s_per_token=summarize(r["decode"]),
            e2e_s=summarize(r["e2e"]),
            stages_s=summarize(r["stages"]),
            peak_memory_bytes=peak,
            visual_per_layer=per_layer,
            layer_average=sum(per_layer) / len(per_layer) if per_layer else 0.0,
            accounting=_accounting(model, plan_obj, n_visual[0], n_text[0], trace, notes),
        )
        configs.append(cfg)
    base = configs[0] if vanilla else None
    if base is not None:
        for cfg in configs[1:]:
            pairs = {
                "prefill": (base.prefill_s, cfg.prefill_s),
                "ttft": (base.ttft_s, cfg.ttft_s),
                "decode": (base.decode_s_per_token, cfg.decode_s_per_token),
                "e2e": (base.e2e_s, cfg.e2e_s),
            }
            cfg.speedup = {
                k: a.median / b.median
                for k, (a, b) in pairs.items()
                if a is not None and b is not None and b.median > 0
            }
            cfg.flop_ratio_limit, cfg.flop_ratio_limit_no_stages = _flop_limits(base.accounting, cfg.accounting)
            cfg.limit_fraction = _limit_fraction(cfg.speedup.get("prefill"), cfg)
    if device.type == "cpu":
        _note(notes, "CPU timings: fp32 matmuls on the host; the FLOP-ratio limit assumes compute-bound layers")
    composed = None
    if settings.compose_layers is not None:
        composed = compose(model, inputs, configs, compiled, settings.compose_layers, settings, n_visual[0], n_text[0])
    return BenchResult(
        configs=configs,
        settings=settings.model_dump(mode="json"),
        inputs={
            "batch_size": int(inputs["input_ids"].shape[0]),
            "sequence_length": int(inputs["input_ids"].shape[1]),
            "n_visual": n_visual,
            "n_text": n_text,
        },
        memory_method=mem_method,
        environment=_environment(device),
        notes=notes,
        compose=composed,
    )


def _flop_limits(base: dict[str, Any] | None, acc: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(vanilla / plan true FLOPs with the stages' FLOPs, the same without them) from two accountings."""
    if not base or not acc or not base.get("flops_true") or not acc.get("flops_true"):
        return None, None
    stages = acc.get("scorer_flops_true", 0.0) + acc.get("selector_flops_true", 0.0)
    return base["flops_true"] / acc["flops_true"], base["flops_true"] / (acc["flops_true"] - stages)


def _limit_fraction(speedup: float | None, cfg: Any) -> dict[str, float]:
    """Speed-up / each FLOP-ratio limit of ``cfg`` (``with_stages``, ``without_stages``)."""
    out = {}
    if speedup is not None:
        for key, limit in (("with_stages", cfg.flop_ratio_limit), ("without_stages", cfg.flop_ratio_limit_no_stages)):
            if limit:
                out[key] = speedup / limit
    return out


def _num_layers(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(cfg.num_hidden_layers)


def _one_run(model, inputs, compiled, settings: BenchSettings, device) -> dict[str, Any]:
    """One timed generate (after the optional separate prefill forward), under the plan when given."""
    if compiled is None:
        return _measure(model, inputs, settings, device, None)
    adapter, plan = compiled
    with adapter.attach(model, plan) as att:
        return _measure(model, inputs, settings, device, att)


def _measure(model, inputs, settings: BenchSettings, device, att) -> dict[str, Any]:
    separate = time_prefill(model, inputs, device) if settings.prefill else float("nan")
    with PeakMemory(device) as mem:
        timing = time_generate(model, inputs, settings.max_new_tokens, device)
    trace = att.trace if att is not None else None  # the generate()'s prefill (decode steps do not replace it)
    stages = sum(st.seconds for st in trace.stages) if trace is not None else 0.0
    return {
        "prefill": timing.prefill_s,
        "separate_prefill": separate,
        "ttft": timing.ttft_s,
        "decode": timing.decode_s_per_token,
        "e2e": timing.e2e_s,
        "stages": stages,
        "peak": mem.peak_bytes,
        "trace": trace,
    }


def _environment(device: torch.device) -> dict[str, Any]:
    import platform

    import transformers

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# -- composed estimates at another depth --------------------------------------------------------
COMPOSE_METHOD = (
    "composed prefill at L decoder layers: vanilla = fixed + L x t(N0); plan = fixed + sum over the L layers of "
    "t(N_l) + stages. t(N) = median time of one forward of decoder layer 0 alone on N random hidden states (the "
    "bench's batch size, causal attention without a padding mask, writing a fresh KV cache); N0 = text + visual "
    "tokens of the input; N_l = text + visual tokens entering layer l under the plan built for L layers. fixed = "
    "median over runs of (one plain vanilla prefill forward - the time inside its decoder layers, timed by forward "
    "hooks): vision tower, projector, embeddings, final norm, LM head at one position. stages = the plan's "
    "measured stage time per run (median) on the benchmarked model"
)
COMPOSE_ASSUMPTIONS = (
    "a decoder layer's time depends on its token count only (all layers alike)",
    "no cache effects across layers: each layer's weights are read again, as at full depth",
    "a stage costs at L layers what it cost on the benchmarked model",
    "the cut's own bookkeeping outside the stages (gathering kept rows, re-slicing positions and masks) is not "
    "counted; the check columns compare the composition with the measured prefill at the benchmarked depth",
)


@dataclass
class ComposedConfig:
    """One configuration's composed prefill at ``ComposeResult.n_layers`` decoder layers.

    ``check`` compares the same composition at the benchmarked model's depth (with the counts
    its trace recorded) with the prefill measured there: ``composed_s``, ``measured_s`` and
    ``ratio`` = composed / measured.
    """

    name: str
    per_layer_tokens: list[int]
    decoder_s: float
    stages_s: float
    prefill_s: float
    speedup: float | None = None
    flop_ratio_limit: float | None = None
    flop_ratio_limit_no_stages: float | None = None
    limit_fraction: dict[str, float] = field(default_factory=dict)
    check: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "per_layer_tokens": self.per_layer_tokens,
            "decoder_s": self.decoder_s,
            "stages_s": self.stages_s,
            "prefill_s": self.prefill_s,
            "speedup": self.speedup,
            "flop_ratio_limit": self.flop_ratio_limit,
            "flop_ratio_limit_no_stages": self.flop_ratio_limit_no_stages,
            "limit_fraction": self.limit_fraction,
            "check": self.check,
        }


@dataclass
class ComposeResult:
    """Composed prefill estimates at ``n_layers`` decoder layers (method: :data:`COMPOSE_METHOD`).

    ``layer_s`` maps a token count to the :class:`Stat` of one decoder layer's forward at that
    count; ``fixed_s`` is the fixed part; ``in_situ_layer_s`` the mean time per decoder layer
    inside the plain vanilla forwards that measured ``fixed_s`` (to compare with
    ``layer_s[N0]``); ``configs`` starts with vanilla.
    """

    n_layers: int
    model_layers: int
    method: str
    assumptions: list[str]
    layer_s: dict[int, Stat]
    fixed_s: Stat
    in_situ_layer_s: Stat
    configs: list[ComposedConfig]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "model_layers": self.model_layers,
            "method": self.method,
            "assumptions": self.assumptions,
            "layer_s": {str(n): s.to_dict() for n, s in self.layer_s.items()},
            "fixed_s": self.fixed_s.to_dict(),
            "in_situ_layer_s": self.in_situ_layer_s.to_dict(),
            "configs": [c.to_dict() for c in self.configs],
        }

    def table(self) -> str:
        """Composed prefill per configuration, with the check at the benchmarked depth."""
        L, M = self.n_layers, self.model_layers
        header = [
            "config",
            "tokens/layer",
            "decoder ms",
            "stages ms",
            f"prefill@{L} ms",
            "x",
            "FLOP limit x",
            "x/limit",
            "no-stage limit x",
            "x/no-stage limit",
            f"composed@{M} ms",
            f"measured@{M} ms",
        ]
        rows = [
            [
                c.name,
                f"{sum(c.per_layer_tokens) / len(c.per_layer_tokens):.1f}",
                f"{c.decoder_s * 1e3:.1f}",
                f"{c.stages_s * 1e3:.1f}",
                f"{c.prefill_s * 1e3:.1f}",
                _fmt_x(c.speedup),
                _fmt_x(c.flop_ratio_limit),
                _fmt_x(c.limit_fraction.get("with_stages")),
                _fmt_x(c.flop_ratio_limit_no_stages),
                _fmt_x(c.limit_fraction.get("without_stages")),
                f"{c.check['composed_s'] * 1e3:.1f}" if "composed_s" in c.check else "-",
                f"{c.check['measured_s'] * 1e3:.1f}" if "measured_s" in c.check else "-",
            ]
            for c in self.configs
        ]
        return format_table(rows, header)

    def describe(self) -> list[str]:
        """The measured parts, the method and its assumptions, one line each."""
        per = ", ".join(f"t({n}) = {s.median * 1e3:.1f} ms" for n, s in sorted(self.layer_s.items()))
        return [
            f"composed at {self.n_layers} decoder layers from the {self.model_layers}-layer model: {per}; "
            f"fixed = {self.fixed_s.median * 1e3:.1f} ms; a vanilla layer inside the plain forward: "
            f"{self.in_situ_layer_s.median * 1e3:.1f} ms",
            f"method: {self.method}",
            "assumptions: " + "; ".join(self.assumptions),
        ]


def _decoder_adapter(model: Any) -> Any:
    """The registered adapter of ``model``, constructed, with the decoder the composition times."""
    from tokenreduce.api import adapter_for
    from tokenreduce.core.errors import UnsupportedModelError

    cls = adapter_for(model)
    adapter = cls(model)
    lm = getattr(adapter, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(adapter, "rotary") or not hasattr(adapter, "positions"):
        raise UnsupportedModelError(
            f"bench.compose_layers: the {cls.__name__} adapter does not expose language_model.layers, positions() "
            "and rotary() (a DecoderAdapter does); composed estimates need one decoder layer to time"
        )
    return adapter


def time_layer(adapter: Any, n_tokens: int, batch_size: int = 1, repeats: int = 3, warmup: int = 1) -> Stat:
    """Seconds of one forward of decoder layer 0 alone on ``n_tokens`` random hidden states.

    ``adapter`` is a constructed :class:`~tokenreduce.adapters.cut.DecoderAdapter` (its
    ``language_model``, ``positions`` and ``rotary``).  Causal attention without a padding mask;
    each call writes a fresh KV cache, as a prefill does.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_layer: repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    run = _layer_run(adapter, n_tokens, batch_size)
    times = [run() for _ in range(warmup + repeats)]
    return summarize(times[warmup:])


def _layer_run(adapter: Any, n_tokens: int, batch_size: int) -> Callable[[], float]:
    """A callable timing one forward of decoder layer 0 on ``n_tokens`` tokens (see :func:`time_layer`)."""
    from transformers import DynamicCache

    if n_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"time_layer: n_tokens and batch_size must be >= 1; got n_tokens={n_tokens}, batch_size={batch_size}"
        )
    lm = adapter.language_model
    layer = lm.layers[0]
    param = next(layer.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(n_tokens)
    hidden = torch.randn(batch_size, n_tokens, lm.config.hidden_size, generator=gen).to(device, dtype)
    positions = adapter.positions(None, batch_size, n_tokens, 0, device)
    cos_sin = adapter.rotary(hidden, positions)

    def run() -> float:
        cache = DynamicCache(config=lm.config)
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            layer(
                hidden,
                attention_mask=None,
                position_ids=positions[0],
                past_key_values=cache,
                use_cache=True,
                position_embeddings=cos_sin,
            )
            _sync(device)
            return time.perf_counter() - t0

    return run


def _fixed_run(model: Any, layers: Any, inputs: Mapping[str, Any]) -> Callable[[], tuple[float, float]]:
    """A callable timing one plain vanilla prefill forward: (the forward's time minus the time inside
    its decoder layers, the mean time per decoder layer), from forward pre/post hooks on every layer."""
    device = next(model.parameters()).device
    inside: list[float] = []
    start: list[float] = []

    def pre(module, args):
        _sync(device)
        start.append(time.perf_counter())

    def post(module, args, output):
        _sync(device)
        inside.append(time.perf_counter() - start.pop())

    def run() -> tuple[float, float]:
        inside.clear()
        handles = [
            h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))
        ]
        try:
            total = time_prefill(model, inputs, device)
        finally:
            for h in handles:
                h.remove()
        return total - sum(inside), sum(inside) / max(1, len(inside))

    return run


def _plans_at_depth(compiled: Mapping[str, tuple[type, Any]], n_layers: int) -> dict[str, Any]:
    """Each plan built for ``n_layers`` decoder layers (a PlanError names the plan whose stage
    does not fit that depth)."""
    from tokenreduce.core.errors import PlanError
    from tokenreduce.core.plan import build_plan

    out = {}
    for name, (adapter_cls, plan) in compiled.items():
        try:
            out[name] = build_plan(plan.plan, n_layers=n_layers, adapter=adapter_cls)
        except PlanError as exc:
            raise PlanError(
                f"bench.compose_layers={n_layers}: plan {name!r} does not fit {n_layers} layers: {exc}"
            ) from exc
    return out


def _config_at_depth(config: Any, n_layers: int) -> Any:
    """A copy of ``config`` whose language model has ``n_layers`` decoder layers."""
    import copy

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config()
    types = getattr(text, "layer_types", None)
    if types:
        if len(set(types)) > 1:
            raise ValueError(f"bench.compose_layers: the decoder mixes layer types {sorted(set(types))}")
        text.layer_types = [types[0]] * n_layers
    text.num_hidden_layers = n_layers
    return cfg


def compose(
    model: Any,
    inputs: Mapping[str, Any],
    configs: list[ConfigResult],
    compiled: Mapping[str, tuple[type, Any]],
    n_layers: int,
    settings: BenchSettings,
    n_visual: int,
    n_text: int,
) -> ComposeResult:
    """Composed prefill estimates at ``n_layers`` decoder layers from measured parts.

    Method (:data:`COMPOSE_METHOD`): vanilla = fixed + ``n_layers`` x t(N0); a plan = fixed +
    sum over the layers of t(N_l) + its stages' measured time, with t(N) as :func:`time_layer`
    times it, fixed from plain vanilla forwards minus the time inside their decoder layers, and
    N_l from the plan built for ``n_layers`` layers.  ``settings.warmup`` + ``settings.repeats``
    rounds, each timing every distinct count once and the fixed forward once (interleaved, so
    changes in machine load hit all parts alike).  Assumptions: :data:`COMPOSE_ASSUMPTIONS`.  The FLOP-ratio limits are
    :func:`tokenreduce.measure.flops.account` of the config at ``n_layers`` layers.

    Args:
        configs: the benchmark's results (vanilla first when measured); their ``stages_s``,
            ``prefill_s`` and ``visual_per_layer`` are used.
        compiled: plan name -> (adapter class, compiled plan) as ``benchmark`` compiled them.
    """
    from .flops import account

    if VANILLA in compiled:
        raise ValueError(f"bench.compose_layers: {VANILLA!r} is reserved for the unreduced model; rename that plan")
    deep_plans = _plans_at_depth(compiled, n_layers)
    adapter = _decoder_adapter(model)
    layers = adapter.language_model.layers
    depth = len(layers)
    batch = int(inputs["input_ids"].shape[0])
    n0 = n_text + n_visual
    wanted: dict[str, tuple[list[int], list[int] | None, Any]] = {VANILLA: ([n0] * n_layers, None, None)}
    for cfg in configs:
        if cfg.name not in deep_plans:
            continue
        at_depth = deep_plans[cfg.name]
        counts = [n_text + v for v in at_depth.plan.visual_per_layer(n_visual, n_layers)]
        wanted[cfg.name] = (counts, [n_text + v for v in cfg.visual_per_layer], at_depth)
    token_counts = sorted({n for counts, check, _ in wanted.values() for n in counts + (check or [])})
    # rounds interleave every count and the fixed forward, so load changes hit all parts alike
    rounds = settings.warmup + settings.repeats
    bar = progress_bar(rounds, "compose", enabled=settings.progress)
    runs = {n: _layer_run(adapter, n, batch) for n in token_counts}
    fixed_run = _fixed_run(model, layers, inputs)
    times: dict[int, list[float]] = {n: [] for n in token_counts}
    fixed_times: list[tuple[float, float]] = []
    try:
        with _threads(settings.threads):
            for r in range(rounds):
                bar.set_postfix_str("warm-up" if r < settings.warmup else f"round {r + 1 - settings.warmup}")
                for n, run in runs.items():
                    times[n].append(run())
                fixed_times.append(fixed_run())
                bar.update(1)
    finally:
        bar.close()
    layer_s = {n: summarize(v[settings.warmup :]) for n, v in times.items()}
    fixed = summarize([f for f, _ in fixed_times[settings.warmup :]])
    in_situ = summarize([t for _, t in fixed_times[settings.warmup :]])

    by_name = {c.name: c for c in configs}
    kv_bytes = next(model.parameters()).dtype.itemsize
    deep_config = _config_at_depth(model.config, n_layers)
    base_acc = account(deep_config, None, n_visual=n_visual, n_text=n_text, kv_dtype_bytes=kv_bytes).to_dict()
    out: list[ComposedConfig] = []
    for name, (counts, check_counts, plan) in wanted.items():
        measured = by_name.get(name)
        stages = measured.stages_s.median if measured is not None else 0.0
        decoder = sum(layer_s[n].median for n in counts)
        row = ComposedConfig(name, counts, decoder, stages, fixed.median + decoder + stages)
        if measured is not None:
            at_model = fixed.median + stages + sum(layer_s[n].median for n in (check_counts or [n0] * depth))
            row.check = {
                "composed_s": at_model,
                "measured_s": measured.prefill_s.median,
                "ratio": at_model / measured.prefill_s.median,
            }
        if plan is not None:
            acc = account(deep_config, plan, n_visual=n_visual, n_text=n_text, kv_dtype_bytes=kv_bytes).to_dict()
            row.flop_ratio_limit, row.flop_ratio_limit_no_stages = _flop_limits(base_acc, acc)
        out.append(row)
    for row in out[1:]:
        row.speedup = out[0].prefill_s / row.prefill_s
        row.limit_fraction = _limit_fraction(row.speedup, row)
    return ComposeResult(
        n_layers=n_layers,
        model_layers=depth,
        method=COMPOSE_METHOD,
        assumptions=list(COMPOSE_ASSUMPTIONS),
        layer_s=layer_s,
        fixed_s=fixed,
        in_situ_layer_s=in_situ,
        configs=out,
    )
