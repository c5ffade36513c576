"""Latency benchmark: vanilla against each plan on the same model and inputs.

For every configuration (``vanilla`` = no plan, then each plan) and every timed repeat:

* **prefill**: one forward of the prompt with the KV cache on (``use_cache=True``,
  ``logits_to_keep=1``), i.e. the model's share of the time to first token;
* **TTFT**, **decode** and **end-to-end**: one greedy ``generate()`` of exactly
  ``max_new_tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), timed by a logits
  processor that stamps the clock after each step's forward: TTFT = first stamp - start (prefill
  plus ``generate``'s own set-up), decode = (last stamp - first stamp) / (steps - 1) per token,
  end-to-end = the whole call;
* **selection**: the time the plan's stages spent scoring and selecting in that ``generate``'s
  prefill (the sum of ``trace.stages[i].seconds``; host clock);
* **peak memory** during the ``generate``: on CUDA ``torch.cuda.max_memory_allocated()`` minus
  the memory allocated before (activations, KV cache, temporaries); on a Linux CPU the peak
  resident set size minus the resident set size before (``/proc/self/status`` ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``).  CPU numbers include allocator effects (memory
  freed earlier and reused is not counted again) and are coarse; where the reset is not
  permitted the peak is reported as ``None`` ("n/a").

Warm-up runs are done and discarded first; configurations are interleaved within each repeat
(vanilla, plan 1, plan 2, vanilla, ...) so machine noise hits them alike.  Each statistic is the
median with min/max and the interquartile range over the repeats.  CUDA work is synchronised
before every clock reading.

Each plan's measured speed-ups sit beside its **FLOP-ratio limit**: the vanilla model's prefill
FLOPs over the plan's (true FLOPs, 2 per multiply-add, vision tower included, with the visual
counts the trace actually recorded), from :func:`tokenreduce.measure.flops.account`.  A prefill
speed-up can approach the limit only where the model is compute-bound and selection is cheap.
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
    "benchmark",
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
    prefill: bool = Field(default=True, description="also time a plain prefill forward (one more forward per run)")
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
    seed: int = 0


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
    """Everything measured for one configuration (vanilla or a plan)."""

    name: str
    plan: dict[str, Any] | None
    prefill_s: Stat | None
    ttft_s: Stat
    decode_s_per_token: Stat
    e2e_s: Stat
    select_s: Stat
    peak_memory_bytes: Stat | None
    visual_per_layer: list[int]
    layer_average: float
    accounting: dict[str, Any] | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    flop_ratio_limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        stat = lambda s: s.to_dict() if s is not None else None  # noqa: E731
        return {
            "name": self.name,
            "plan": self.plan,
            "prefill_s": stat(self.prefill_s),
            "ttft_s": stat(self.ttft_s),
            "decode_s_per_token": stat(self.decode_s_per_token),
            "e2e_s": stat(self.e2e_s),
            "select_s": stat(self.select_s),
            "peak_memory_bytes": stat(self.peak_memory_bytes),
            "visual_per_layer": self.visual_per_layer,
            "layer_average": self.layer_average,
            "speedup": self.speedup,
            "flop_ratio_limit": self.flop_ratio_limit,
            "accounting": self.accounting,
        }


@dataclass
class BenchResult:
    """The benchmark of vanilla and every plan on one model and input batch."""

    configs: list[ConfigResult]
    settings: dict[str, Any]
    inputs: dict[str, Any]
    memory_method: str
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "inputs": self.inputs,
            "memory_method": self.memory_method,
            "environment": self.environment,
            "notes": self.notes,
            "configs": [c.to_dict() for c in self.configs],
        }

    def table(self) -> str:
        """A plain-text table: medians with [min-max], speed-ups beside the FLOP-ratio limit."""
        header = [
            "config",
            "layer avg",
            "prefill ms",
            "TTFT ms",
            "decode ms/tok",
            "e2e ms",
            "select ms",
            "peak MiB",
            "prefill x",
            "TTFT x",
            "e2e x",
            "FLOP limit x",
        ]
        rows = []
        for c in self.configs:
            rows.append(
                [
                    c.name,
                    f"{c.layer_average:.1f}",
                    _fmt_stat(c.prefill_s, 1e3),
                    _fmt_stat(c.ttft_s, 1e3),
                    _fmt_stat(c.decode_s_per_token, 1e3),
                    _fmt_stat(c.e2e_s, 1e3),
                    f"{c.select_s.median * 1e3:.1f}",
                    f"{c.peak_memory_bytes.median / 2**20:.0f}" if c.peak_memory_bytes is not None else "n/a",
                    _fmt_x(c.speedup.get("prefill")),
                    _fmt_x(c.speedup.get("ttft")),
                    _fmt_x(c.speedup.get("e2e")),
                    _fmt_x(c.flop_ratio_limit),
                ]
            )
        return format_table(rows, header)


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
    ttft_s: float
    decode_s_per_token: float
    e2e_s: float
    steps: int
    sequences: Any


def time_generate(model: Any, inputs: Mapping[str, Any], max_new_tokens: int, device: torch.device) -> GenerateTiming:
    """Greedy ``generate()`` of exactly ``max_new_tokens`` tokens, timed per step (see module doc)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class _StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

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
    if len(stamps) < 2:
        raise RuntimeError(f"generate() ran {len(stamps)} step(s); decode timing needs >= 2 (max_new_tokens >= 2)")
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return GenerateTiming(stamps[0] - t0, decode, t1 - t0, len(stamps), out)


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
    if VANILLA in plans and vanilla:
        raise ValueError(f"benchmark: {VANILLA!r} is reserved for the unreduced model; rename that plan")
    n_visual, n_text = count_tokens(model, inputs)
    notes: list[str] = []
    if len(set(n_visual)) > 1 or len(set(n_text)) > 1:
        _note(notes, f"samples differ in length (visual {n_visual}, text {n_text}); FLOPs use sample 0")

    records: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in ("prefill", "ttft", "decode", "e2e", "select", "peak")} for n in names
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
            prefill_s=summarize(r["prefill"]) if settings.prefill else None,
            ttft_s=summarize(r["ttft"]),
            decode_s_per_token=summarize(r["decode"]),
            e2e_s=summarize(r["e2e"]),
            select_s=summarize(r["select"]),
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
            fb = (base.accounting or {}).get("flops_true")
            fc = (cfg.accounting or {}).get("flops_true")
            cfg.flop_ratio_limit = fb / fc if fb and fc else None
    if device.type == "cpu":
        _note(notes, "CPU timings: fp32 matmuls on the host; the FLOP-ratio limit assumes compute-bound layers")
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
    )


def _num_layers(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(cfg.num_hidden_layers)


def _one_run(model, inputs, compiled, settings: BenchSettings, device) -> dict[str, Any]:
    """One prefill forward (optional) and one timed generate, under the plan when given."""
    if compiled is None:
        return _measure(model, inputs, settings, device, None)
    adapter, plan = compiled
    with adapter.attach(model, plan) as att:
        return _measure(model, inputs, settings, device, att)


def _measure(model, inputs, settings: BenchSettings, device, att) -> dict[str, Any]:
    prefill = time_prefill(model, inputs, device) if settings.prefill else float("nan")
    with PeakMemory(device) as mem:
        timing = time_generate(model, inputs, settings.max_new_tokens, device)
    trace = att.trace if att is not None else None
    select = sum(st.seconds for st in trace.stages) if trace is not None else 0.0
    return {
        "prefill": prefill,
        "ttft": timing.ttft_s,
        "decode": timing.decode_s_per_token,
        "e2e": timing.e2e_s,
        "select": select,
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
