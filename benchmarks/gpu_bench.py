"""GPU benchmark of the 7B presets: attention-kernel parity, speed-ups and peak memory.

Two parts, on random weights of the real architectures (``conf/model/llava_1_5_7b.yaml`` and
``conf/model/llava_next_7b.yaml`` with ``kind: config``, built directly on the GPU in bfloat16 by
:func:`tokenreduce.models.load_model`; no download) and synthetic inputs of the papers' shapes
(LLaVA-1.5: 576 visual + 60 text tokens; LLaVA-NeXT: a 672x672 image, 2928 visual + 60 text):

* **parity** -- every plan of :data:`PARITY_PLANS` (the in-LLM presets plus ``visionzip_64`` at
  the encoder) and the unreduced model run a greedy ``generate()`` on the same batch of two samples
  (the second left-padded, so the padded path of every kernel runs) under each attention
  implementation: ``eager`` (the reference), ``sdpa`` and, when the ``flash_attn`` package is
  installed, ``flash_attention_2``.  A plan is at parity when the kept sets of every stage and
  sample (``trace.stages[i].kept``) equal eager's and the logits are within the stated tolerance
  (elementwise ``|x - ref| <= atol + rtol * |ref|``, compared over the decode steps up to and
  including the first step where a greedy token differs).  The unreduced model's row is the noise
  floor of the kernels themselves.  Mismatches and errors are reported, never raised.
* **speed** -- prefill and end-to-end (``generate()`` of ``--new-tokens`` tokens) time of
  vanilla and every plan of :data:`SPEED_PLANS` at each batch size, with
  :func:`tokenreduce.measure.latency.benchmark` (``torch.cuda.synchronize`` around every clock
  reading, warm-up, interleaved repeats, medians, FLOP-ratio limits) and the peak memory of the
  ``generate()`` call (``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``, above
  the weights and inputs), with the fastest available kernel (``flash_attention_2`` when
  installed, else ``sdpa``; ``--speed-attn`` chooses).

Random weights (the stock ``initializer_range`` 0.02) give near-uniform attention, so scores of
different tokens can be close; a kept set that differs from eager's in a few tokens is reported
with its overlap (the share of eager's kept tokens also kept) so a near-tie can be told from a
broken kernel path.

``--cpu-smoke`` runs the same code on the CPU in seconds: the same two architectures and plans
with tiny widths (decoder width 64 with all 32 layers, so every preset's cut layers exist; a
2-layer vision tower of width 32; LLaVA-NeXT at a 112 px base), float32, eager and sdpa, batch
sizes 1 and 2, one repeat.  The test suite runs it (``tests/benchmarks/test_gpu_script.py``).

Results: ``<out>/report.json`` and ``<out>/report.md``, rewritten after every part so that a run
stopped by its time budget keeps what it finished.  Exit status: 0; 1 when something errored (a
model that could not be built, a kernel path that raised: listed under Errors) or, with
``--fail-on-mismatch``, a parity row is not at parity; 130 when interrupted; 2 for bad arguments
or no CUDA without ``--cpu-smoke``.

Usage::

    benchmarks/gpu.sh                                   # on a CUDA machine (environment, budget, report)
    python benchmarks/gpu_bench.py --out outputs/gpu    # the same without the wrapper
    python benchmarks/gpu_bench.py --cpu-smoke --out /tmp/smoke

Time on one H200-class GPU with the defaults (estimates): building each 7B model 10-30 s;
parity 7 configurations x 3 kernels x a 4-token generate at batch 2, under 30 s per model;
speed at batch 1 and 8, 1 warm-up + 5 repeats of a 32-token generate (prefill timed inside it) for 7
configurations on LLaVA-1.5 (about 1-2 min) and 2 on LLaVA-NeXT (about 1 min).  ``--budget-s``
(default 450) skips what would start after the budget is spent and says so in the report.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tokenreduce
from tokenreduce.cli.output import jsonable
from tokenreduce.core.plan import Plan
from tokenreduce.core.presets import load_preset
from tokenreduce.measure.configs import model_config
from tokenreduce.measure.latency import VANILLA, BenchSettings, benchmark
from tokenreduce.models import load_model

#: plans checked for kernel parity per model conf (the in-LLM presets; visionzip_64 cuts at the encoder)
PARITY_PLANS = {
    "llava_1_5_7b": ["pio_64", "fastv_64", "pdrop_64", "sparsevlm_64", "dart_64", "visionzip_64"],
    "llava_next_7b": ["next_pio_11"],
}
#: plans timed against vanilla per model conf
SPEED_PLANS = {
    "llava_1_5_7b": ["pio_64", "fastv_64", "pdrop_64", "sparsevlm_64", "dart_64", "visionzip_64"],
    "llava_next_7b": ["next_pio_11"],
}
REFERENCE_IMPL = "eager"
#: the parity tolerance (atol, rtol) per dtype, unless --atol/--rtol are given
TOLERANCE = {torch.bfloat16: (0.1, 0.05), torch.float16: (0.05, 0.02), torch.float32: (1e-3, 1e-3)}

#: --cpu-smoke: tiny widths on the real configs (all 32 decoder layers so every preset's cut layers exist)
SMOKE_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
SMOKE_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
#: --cpu-smoke LLaVA-NeXT: a 112 px base (8x8 patches) with the pinpoints scaled by 1/3 (2x2 grid: 336 tokens)
SMOKE_NEXT_BASE = 112


# -- settings -------------------------------------------------------------------------------------
@dataclass
class Settings:
    smoke: bool
    device: torch.device
    dtype: torch.dtype
    models: list[str]
    parity_impls: list[str]
    speed_attn: str
    batch_sizes: list[int]
    new_tokens: int
    warmup: int
    repeats: int
    parity_tokens: int
    parity_pad: int
    atol: float
    rtol: float
    budget_s: float
    out: Path
    parity: bool
    speed: bool
    progress: bool
    fail_on_mismatch: bool

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["device"], d["dtype"], d["out"] = str(self.device), str(self.dtype).replace("torch.", ""), str(self.out)
        return d


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description="GPU benchmark of the 7B presets: flash-attention-2/sdpa parity with eager, speed-ups vs "
        "vanilla at batch 1 and 8, peak memory (random weights of the real shapes, no download)."
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny widths, CPU, float32, eager+sdpa, batch 1 and 2")
    p.add_argument("--out", default="outputs/gpu", help="folder for report.json and report.md (default outputs/gpu)")
    p.add_argument(
        "--models", nargs="+", choices=sorted(PARITY_PLANS), default=list(PARITY_PLANS), help="model confs to run"
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="speed: batch sizes (default 1 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="speed: tokens per generate() (default 32)")
    p.add_argument("--warmup", type=int, default=None, help="speed: untimed rounds first (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="speed: timed rounds, median reported (default 5)")
    p.add_argument("--parity-tokens", type=int, default=None, help="parity: greedy tokens generated (default 4)")
    p.add_argument("--parity-pad", type=int, default=8, help="parity: left padding of the second sample (default 8)")
    p.add_argument("--atol", type=float, default=None, help="parity: absolute logits tolerance (bf16 default 0.1)")
    p.add_argument("--rtol", type=float, default=None, help="parity: relative logits tolerance (bf16 default 0.05)")
    p.add_argument(
        "--speed-attn",
        choices=["auto", "flash_attention_2", "sdpa", "eager"],
        default="auto",
        help="speed: attention kernel (auto: flash_attention_2 when installed, else sdpa)",
    )
    p.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would start after this many s")
    p.add_argument("--skip-parity", action="store_true", help="only the speed part")
    p.add_argument("--skip-speed", action="store_true", help="only the parity part")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: smoke 1)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress lines on stderr")
    p.add_argument(
        "--fail-on-mismatch", action="store_true", help="exit with status 1 when a parity row is not at parity"
    )
    a = p.parse_args(argv)

    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        p.error("CUDA is not available: this benchmark needs a GPU (use --cpu-smoke for the CPU check of the script)")
    for name in ("new_tokens", "warmup", "repeats", "parity_tokens", "threads"):
        value = getattr(a, name)
        low = 0 if name == "warmup" else (2 if name == "new_tokens" else 1)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
    if a.batch_sizes is not None and any(b < 1 for b in a.batch_sizes):
        p.error(f"--batch-sizes must be >= 1; got {a.batch_sizes}")
    if a.parity_pad < 0:
        p.error(f"--parity-pad must be >= 0; got {a.parity_pad}")
    if a.skip_parity and a.skip_speed:
        p.error("--skip-parity and --skip-speed together leave nothing to run")
    if smoke and a.speed_attn == "flash_attention_2":
        p.error("--speed-attn flash_attention_2 needs CUDA; --cpu-smoke runs on the CPU (use sdpa or eager)")

    device = torch.device("cpu") if smoke else torch.device("cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    impls = [REFERENCE_IMPL, "sdpa"] + (["flash_attention_2"] if flash else [])
    speed_attn = a.speed_attn if a.speed_attn != "auto" else ("flash_attention_2" if flash else "sdpa")
    if speed_attn == "flash_attention_2" and not flash:
        p.error(
            "--speed-attn flash_attention_2: the flash_attn package is not installed (benchmarks/gpu.sh "
            "--install-flash-attn installs it)"
        )
    atol, rtol = TOLERANCE[dtype]
    threads = a.threads if a.threads is not None else (1 if smoke else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return Settings(
        smoke=smoke,
        device=device,
        dtype=dtype,
        models=list(dict.fromkeys(a.models)),
        parity_impls=impls,
        speed_attn=speed_attn,
        batch_sizes=a.batch_sizes or ([1, 2] if smoke else [1, 8]),
        new_tokens=a.new_tokens or (2 if smoke else 32),
        warmup=a.warmup if a.warmup is not None else (0 if smoke else 1),
        repeats=a.repeats or (1 if smoke else 5),
        parity_tokens=a.parity_tokens or (3 if smoke else 4),
        parity_pad=a.parity_pad,
        atol=a.atol if a.atol is not None else atol,
        rtol=a.rtol if a.rtol is not None else rtol,
        budget_s=a.budget_s,
        out=Path(a.out),
        parity=not a.skip_parity,
        speed=not a.skip_speed,
        progress=not a.no_progress,
        fail_on_mismatch=a.fail_on_mismatch,
    )


# -- models and inputs ----------------------------------------------------------------------------
def model_conf(name: str, s: Settings) -> dict[str, Any]:
    """The model conf ``name`` as ``kind: config`` (random weights of its ``hf_config``) on the
    run's device and dtype; with ``--cpu-smoke`` its widths shrunk (:data:`SMOKE_TEXT`, ...)."""
    conf = model_config(name)
    conf.update(kind="config", device=str(s.device), dtype=str(s.dtype).replace("torch.", ""))
    conf["attn_implementation"] = REFERENCE_IMPL if s.parity else s.speed_attn
    if s.smoke:
        hf = copy.deepcopy(conf["hf_config"])
        hf["text_config"].update(SMOKE_TEXT)
        hf["vision_config"].update(SMOKE_VISION)
        if "image_grid_pinpoints" in hf:  # LLaVA-NeXT: a smaller base image and grid, same layout
            scale = hf["vision_config"]["image_size"] // SMOKE_NEXT_BASE
            hf["vision_config"]["image_size"] = SMOKE_NEXT_BASE
            hf["image_grid_pinpoints"] = [[h // scale, w // scale] for h, w in hf["image_grid_pinpoints"]]
            hf["image_seq_length"] = (SMOKE_NEXT_BASE // hf["vision_config"]["patch_size"]) ** 2
            conf["n_visual"] = max(1, conf["n_visual"] // scale**2)
        conf["hf_config"] = hf
        conf["name"] = f"{conf.get('name') or name} (smoke widths)"
    return conf


def left_pad(inputs: dict[str, Any], pad: int, pad_id: int, image_id: int) -> dict[str, Any]:
    """``inputs`` with the last sample shifted right by ``pad`` positions: ``pad`` padding tokens
    (attention mask 0) in front and its last ``pad`` text tokens dropped (they follow the image, so
    the visual tokens are untouched).  A batch of one sample, or ``pad`` 0, is returned unchanged.

    Raises:
        ValueError: fewer than ``pad + 1`` text tokens follow the last sample's image.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if pad == 0 or ids.shape[0] < 2:
        return inputs
    row = ids[-1]
    image = (row == image_id).nonzero()
    trailing = ids.shape[1] - 1 - (int(image.max()) if image.numel() else -1)
    if pad >= trailing:
        raise ValueError(f"--parity-pad {pad} must be below the {trailing} text tokens after the image")
    ids, mask = ids.clone(), mask.clone()
    ids[-1] = torch.cat([row.new_full((pad,), pad_id), row[:-pad]])
    mask[-1, :pad] = 0
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- parity -----------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One greedy generate(): kept sets per stage and sample, tokens ``[B, N]``, raw logits ``[B, N, V]``."""

    kept: list[list[list[int]]]
    visual_after: list[list[int]]
    tokens: torch.Tensor
    logits: torch.Tensor


def generate(model: Any, inputs: dict[str, Any], plan: Plan | None, n_tokens: int) -> Generation:
    """Greedy ``generate()`` of exactly ``n_tokens`` tokens, under ``plan`` when given."""

    def go():
        return model.generate(
            **inputs,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )

    with torch.no_grad():
        if plan is None:
            out, stages = go(), []
        else:
            with tokenreduce.apply(model, plan) as att:
                out = go()
            stages = att.trace.stages
    return Generation(
        kept=[[sorted(k) for k in st.kept] for st in stages],
        visual_after=[list(st.visual_after) for st in stages],
        tokens=out.sequences[:, inputs["input_ids"].shape[1] :].cpu(),
        logits=torch.stack(out.logits, 1).float().cpu(),
    )


def compare(ref: Generation, run: Generation, atol: float, rtol: float) -> dict[str, Any]:
    """Kept sets and logits of ``run`` against ``ref`` (see the module docstring)."""
    pairs = [(set(a), set(b)) for st_a, st_b in zip(run.kept, ref.kept) for a, b in zip(st_a, st_b)]
    kept_equal = len(run.kept) == len(ref.kept) and all(a == b for a, b in pairs)
    overlap = min((len(a & b) / max(1, len(b)) for a, b in pairs), default=1.0)
    differs = (run.tokens != ref.tokens).any(0).nonzero()
    steps = int(differs[0]) + 1 if differs.numel() else int(ref.tokens.shape[1])
    a, b = run.logits[:, :steps], ref.logits[:, :steps]
    delta = (a - b).abs()
    bound = atol + rtol * b.abs()
    within = bool((delta <= bound).all())
    problems = []
    if not kept_equal:
        problems.append("kept sets differ")
    if run.visual_after != ref.visual_after:
        problems.append("visual counts differ")
    if not within:
        problems.append("logits beyond tolerance")
    return {
        "status": "ok" if not problems else "; ".join(problems),
        "kept_equal": kept_equal if ref.kept else None,
        "kept_overlap_min": overlap if ref.kept else None,
        "visual_after": run.visual_after,
        "reference_visual_after": ref.visual_after,
        "tokens_equal": not differs.numel(),
        "steps_compared": steps,
        "logits_max_abs_diff": float(delta.max()),
        "logits_max_diff_over_bound": float((delta / bound).max()),
        "reference_logits_std": float(b.std()),
        "logits_within_tolerance": within,
    }


def use_kernel(model: Any, impl: str) -> str | None:
    """Switch ``model`` to the attention implementation ``impl`` and check that its language model
    now runs it.  When the vision tower refuses ``impl`` (not the reference), only the language model
    switches and the vision tower runs sdpa; the returned note says so (else None).

    Raises:
        RuntimeError: the language model does not report ``impl`` afterwards (a parity row would
            compare a kernel with itself).
    """
    note = None
    try:
        model.set_attn_implementation(impl)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/ImportError/RuntimeError here
        if impl == REFERENCE_IMPL:
            raise
        model.set_attn_implementation({"text_config": impl, "vision_config": "sdpa"})
        note = f"vision tower on sdpa ({impl} refused there: {str(exc).splitlines()[0][:200]})"
    got = getattr(model.config, "text_config", model.config)._attn_implementation
    if got != impl:
        raise RuntimeError(f"the language model runs {got!r} after switching to {impl!r}")
    return note


def parity(name: str, loaded: Any, s: Settings, report: dict[str, Any], t0: float) -> None:
    """Every plan of :data:`PARITY_PLANS` and vanilla under each kernel, against eager."""
    model = loaded.model
    text = getattr(model.config, "text_config", model.config)
    pad_id = next(i for i in (getattr(model.config, "pad_token_id", None), text.pad_token_id, 0) if i is not None)
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    try:
        inputs = left_pad(loaded.synthetic_inputs(2, seed=1), s.parity_pad, int(pad_id), int(image_id))
    except ValueError as exc:
        report["errors"].append(f"parity {name}: {exc}")
        log(report["errors"][-1])
        return
    plans = {p: load_preset(p) for p in PARITY_PLANS[name]}  # composed once (Hydra takes ~0.3 s a preset)
    for plan in [VANILLA, *plans]:
        if over_budget(s, t0, report, f"parity {name} {plan}"):
            return
        started = time.perf_counter()
        runs: dict[str, Generation | str] = {}
        notes: dict[str, str | None] = {}
        for impl in s.parity_impls:
            try:
                notes[impl] = use_kernel(model, impl)
                runs[impl] = generate(model, inputs, plans.get(plan), s.parity_tokens)
            except Exception as exc:  # noqa: BLE001 - a failing kernel path is a result, not a crash
                runs[impl] = f"{type(exc).__name__}: {exc}".strip()[:500]
                free_memory(s.device)
        ref = runs[REFERENCE_IMPL]
        for impl in s.parity_impls[1:]:
            row: dict[str, Any] = {"model": name, "plan": plan, "impl": impl, "reference": REFERENCE_IMPL}
            run = runs[impl]
            if isinstance(ref, str) or isinstance(run, str):
                row.update(status="error", error=ref if isinstance(ref, str) else run)
                report["errors"].append(f"parity {name} {plan} {impl}: {row['error']}")
            else:
                row.update(compare(ref, run, s.atol, s.rtol))
            if notes.get(impl):
                row["note"] = notes[impl]
            report["parity"].append(row)
            log(
                f"parity {name} {plan:<13} {impl:<17} {row['status']}"
                + (f" (max |dlogit| {row['logits_max_abs_diff']:.3g})" if "logits_max_abs_diff" in row else "")
            )
        report["timings_s"][f"parity {name} {plan}"] = time.perf_counter() - started


# -- speed ------------------------------------------------------------------------------------------
def speed(name: str, loaded: Any, s: Settings, report: dict[str, Any], t0: float) -> None:
    """Vanilla and every plan of :data:`SPEED_PLANS` at each batch size (``latency.benchmark``)."""
    model = loaded.model
    try:
        note = use_kernel(model, s.speed_attn)
    except Exception as exc:  # noqa: BLE001 - reported; the next model may still run
        report["errors"].append(f"speed {name}: cannot switch to {s.speed_attn}: {type(exc).__name__}: {exc}")
        log(report["errors"][-1])
        return
    if note:
        report["notes"].append(f"speed {name}: {note}")
    plans = {p: load_preset(p) for p in SPEED_PLANS[name]}
    for batch in s.batch_sizes:
        part = f"speed {name} batch {batch}"
        if over_budget(s, t0, report, part):
            return
        started = time.perf_counter()
        entry: dict[str, Any] = {"model": name, "batch_size": batch, "attn_implementation": s.speed_attn}
        try:
            inputs = loaded.synthetic_inputs(batch, seed=0)
            bench = BenchSettings(
                warmup=s.warmup, repeats=s.repeats, max_new_tokens=s.new_tokens, batch_size=batch, progress=s.progress
            )
            result = benchmark(model, inputs, plans, bench)
            entry["result"] = result.to_dict()
            log(f"{part} ({s.speed_attn}):\n{result.table()}")
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch: reported
            entry["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
            report["errors"].append(f"{part}: {entry['error']}")
            log(f"{part}: {entry['error']}")
            free_memory(s.device)
        report["speed"].append(entry)
        report["timings_s"][part] = time.perf_counter() - started


# -- driver -----------------------------------------------------------------------------------------
def log(text: str) -> None:
    print(text, flush=True)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def over_budget(s: Settings, t0: float, report: dict[str, Any], part: str) -> bool:
    """True (and the part listed as skipped) once ``--budget-s`` seconds have passed."""
    elapsed = time.perf_counter() - t0
    if elapsed <= s.budget_s:
        return False
    report["skipped"].append(f"{part}: not started, {elapsed:.0f} s > budget {s.budget_s:.0f} s")
    log(f"skipped {part}: over the time budget")
    return True


def environment(s: Settings) -> dict[str, Any]:
    import transformers

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenreduce": version("tokenreduce"),
        "flash_attn": version("flash-attn") or version("flash_attn"),
        "device": str(s.device),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def run_model(name: str, s: Settings, report: dict[str, Any], t0: float) -> None:
    if over_budget(s, t0, report, f"{name} (build, parity, speed)"):
        return
    started = time.perf_counter()
    try:
        loaded = load_model(model_conf(name, s), name=name)
    except Exception as exc:  # noqa: BLE001 - the other model may still run
        report["errors"].append(f"{name}: could not be built: {type(exc).__name__}: {exc}")
        log(report["errors"][-1])
        return
    info = loaded.describe()
    info["weights_mib"] = param_bytes(loaded.model) / 2**20
    info["build_s"] = time.perf_counter() - started
    report["models"][name] = info
    log(
        f"{name}: {info['parameters'] / 1e9:.2f} B parameters, {info['decoder_layers']} decoder layers, "
        f"{info['dtype']} on {info['device']}, built in {info['build_s']:.1f} s"
    )
    try:
        if s.parity:
            parity(name, loaded, s, report, t0)
            write_report(report, s.out)
        if s.speed:
            speed(name, loaded, s, report, t0)
            write_report(report, s.out)
    finally:
        del loaded
        free_memory(s.device)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "settings": s.to_dict(),
        "environment": environment(s),
        "models": {},
        "parity": [],
        "speed": [],
        "timings_s": {},
        "skipped": [],
        "errors": [],
        "notes": [],
        "complete": False,
    }
    log("environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()))
    interrupted = False
    try:
        for name in s.models:
            run_model(name, s, report, t0)
        report["complete"] = not report["skipped"]
    except KeyboardInterrupt:
        interrupted = True
        report["notes"].append("interrupted (the time limit of benchmarks/gpu.sh or Ctrl-C): partial results")
        log(report["notes"][-1])
    except Exception:  # noqa: BLE001 - keep what finished (written below), then fail
        report["errors"].append("crashed:\n" + traceback.format_exc(limit=8))
        raise
    finally:
        report["elapsed_s"] = time.perf_counter() - t0
        write_report(report, s.out)
    bad = [r for r in report["parity"] if r["status"] != "ok"]
    log(
        f"parity: {len(report['parity']) - len(bad)}/{len(report['parity'])} rows at parity; "
        f"{len(report['errors'])} error(s); elapsed {report['elapsed_s']:.1f} s; report: {s.out / 'report.md'}"
    )
    if interrupted:
        return 130
    return 1 if report["errors"] or (bad and s.fail_on_mismatch) else 0


# -- the report -------------------------------------------------------------------------------------
def md_table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _median(config: dict[str, Any], key: str, scale: float) -> float | None:
    """``config[key]["median"] * scale`` of a benchmark configuration, None where not measured."""
    stat = config.get(key)
    return stat["median"] * scale if isinstance(stat, dict) and stat.get("median") is not None else None


def markdown(report: dict[str, Any]) -> str:
    env, st = report["environment"], report["settings"]
    out = ["# GPU benchmark report", ""]
    out.append(md_table([[k, v] for k, v in env.items()], ["environment", ""]))
    out += [
        "",
        f"{st['dtype']} random weights of the real shapes; parity kernels {', '.join(st['parity_impls'])} "
        f"(reference {REFERENCE_IMPL}), {st['parity_tokens']} greedy tokens, batch 2 with the second sample "
        f"left-padded by {st['parity_pad']}, tolerance |x - ref| <= {st['atol']:g} + {st['rtol']:g} |ref|; "
        f"speed with {st['speed_attn']}, batch {', '.join(map(str, st['batch_sizes']))}, {st['new_tokens']} new "
        f"tokens, median of {st['repeats']} after {st['warmup']} warm-up. Elapsed {report.get('elapsed_s', 0):.0f} s"
        + ("." if report["complete"] else " (incomplete: see Skipped and notes)."),
        "",
    ]
    if report["models"]:
        rows = [
            [
                n,
                m["name"],
                f"{m['parameters'] / 1e9:.2f} B",
                m["decoder_layers"],
                m["dtype"],
                f"{m['weights_mib']:.0f}",
                f"{m['build_s']:.1f}",
            ]
            for n, m in report["models"].items()
        ]
        out += [md_table(rows, ["model conf", "name", "parameters", "layers", "dtype", "weights MiB", "build s"]), ""]
    if report["parity"]:
        out += ["## Parity (reference: eager)", ""]
        rows = []
        for r in report["parity"]:
            if r["status"] == "error":
                rows.append([r["model"], r["plan"], r["impl"], "-", "-", "-", "-", "-", "error: " + r["error"]])
                continue
            kept = "-" if r["kept_equal"] is None else ("identical" if r["kept_equal"] else "differ")
            rows.append(
                [
                    r["model"],
                    r["plan"],
                    r["impl"],
                    kept,
                    _num(r["kept_overlap_min"], ".3f"),
                    f"{'yes' if r['tokens_equal'] else 'no'} ({r['steps_compared']} compared)",
                    _num(r["logits_max_abs_diff"], ".3g"),
                    _num(r["logits_max_diff_over_bound"], ".2f"),
                    r["status"] + (f" ({r['note']})" if r.get("note") else ""),
                ]
            )
        header = [
            "model",
            "plan",
            "kernel",
            "kept sets",
            "min overlap",
            "tokens equal",
            "max abs dlogit",
            "dlogit / bound",
            "status",
        ]
        out += [
            md_table(rows, header),
            "",
            "kept sets: every stage's kept visual tokens of both samples equal eager's; min overlap: the smallest "
            "share of eager's kept tokens also kept (near-ties of random-weight scores show as a few swapped "
            "tokens); tokens equal: the greedy tokens, logits compared up to the first step that differs; "
            "dlogit / bound: the largest |x - ref| / (atol + rtol |ref|), at most 1 within tolerance. "
            "The vanilla rows are the kernels' own noise floor.",
            "",
        ]
    for entry in report["speed"]:
        out += [f"## Speed: {entry['model']}, batch {entry['batch_size']}, {entry['attn_implementation']}", ""]
        if "error" in entry:
            out += [f"error: {entry['error']}", ""]
            continue
        res = entry["result"]
        rows = []
        for c in res["configs"]:
            speedup = c.get("speedup") or {}
            rows.append(
                [
                    c["name"],
                    _num(c.get("layer_average"), ".1f"),
                    _num(_median(c, "prefill_s", 1e3), ".1f"),
                    _num(_median(c, "stages_s", 1e3), ".1f"),
                    _num(_median(c, "e2e_s", 1e3), ".1f"),
                    _num(_median(c, "decode_s_per_token", 1e3), ".2f"),
                    _num(_median(c, "peak_memory_bytes", 2**-20), ".0f"),
                    _num(speedup.get("prefill"), ".2f"),
                    _num(speedup.get("e2e"), ".2f"),
                    _num(c.get("flop_ratio_limit"), ".2f"),
                ]
            )
        header = [
            "config",
            "layer avg",
            "prefill ms",
            "stages ms",
            "e2e ms",
            "decode ms/tok",
            "peak MiB",
            "prefill x",
            "e2e x",
            "FLOP limit x",
        ]
        seq = res["inputs"]
        out += [
            f"{seq['sequence_length']} tokens per sample ({seq['n_visual'][0]} visual); peak MiB: "
            f"{res['memory_method']}.",
            "",
            md_table(rows, header),
            "",
        ]
    if report["errors"]:
        out += ["## Errors", ""] + [f"- {x}" for x in report["errors"]] + [""]
    if report["skipped"] or report["notes"]:
        out += ["## Skipped and notes", ""] + [f"- {x}" for x in report["skipped"] + report["notes"]] + [""]
    return "\n".join(out)


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
