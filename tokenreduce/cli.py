"""The ``tokenreduce`` command.

    tokenreduce demo  [overrides]   apply a plan to a tiny built-in LLaVA and show what it kept
    tokenreduce run   [overrides]   answer a question about an image with `plan` (and without it)
    tokenreduce eval  [overrides]   accuracy and fidelity of vanilla and each plan on a task (easy-VQA)
    tokenreduce bench [overrides]   latency of vanilla and each plan: prefill, TTFT, decode, generate, memory
    tokenreduce flops [overrides]   FLOPs (true and paper conventions) and KV cache of each plan
    tokenreduce viz   [overrides]   PNG of the kept visual tokens, one panel per plan
    tokenreduce list  [out_dir=DIR] registered components and the presets of every config group
    tokenreduce plans [--depth 32] [--visual 576] [name ...]
                                    each plan preset's keep counts and layer average

Overrides are Hydra overrides of ``conf/config.yaml``: ``plan=pio_64``, ``model=llava_1_5_7b``,
``model.text_layers=4``, ``plan.stages.0.keep=32``, ``plans=[pio_64,fastv_64]``,
``bench.repeats=5``, ``task.n=50``, ``out_dir=results/x``.  run/eval/bench/flops/viz write the
resolved, validated ``config.yaml`` and ``results.json`` (plus their own files) into ``out_dir``
(default ``outputs/<command>/<date>_<time>``).  See docs/cli.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import BenchSettings, format_si, format_table
from tokenreduce.measure.tasks import EvalSettings, TaskSettings
from tokenreduce.models import ModelSettings, format_settings_error
from tokenreduce.viz import VizSettings

COMMANDS = ("demo", "run", "eval", "bench", "flops", "viz", "list", "plans")
PLAN_ENTRY = "plan"  # in `plans=[...]`: the composed `plan` with its overrides
_DEFAULT_PICTURE = (128, 96)

log = logging.getLogger("tokenreduce")


# -- settings sections ---------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoSettings(_Section):
    """``demo``: the README's main job."""

    prompt: str = "USER: <image> what color is the shape? ASSISTANT:"
    max_new_tokens: int = Field(default=8, ge=1)
    repeats: int = Field(default=5, ge=1)
    seed: int = 0


class RunSettings(_Section):
    """``run``: one answer with and without the plan."""

    question: str = "what color is the shape?"
    prompt: str | None = Field(default=None, description="a whole prompt (with the image placeholder) instead of template + question")
    image: str | None = Field(default=None, description="an image file; null: a synthetic picture")
    image_size: list[int] | None = Field(default=None, min_length=2, max_length=2, description="synthetic picture [width, height]")
    max_new_tokens: int = Field(default=16, ge=1)
    vanilla: bool = True
    seed: int = 0


class FlopsSettings(_Section):
    """``flops``: accounting options (see tokenreduce.measure.flops.account)."""

    n_visual: int | None = Field(default=None, ge=1)
    n_text: int | None = Field(default=None, ge=1)
    kv_dtype_bytes: Literal[1, 2, 4, 8] = 2
    include_vision: bool = True
    probe_backward_factor: float = Field(default=2.0, ge=0.0)


class Prompts(_Section):
    """``prompts``: a template per architecture (image placeholder + ``{question}``)."""

    llava: str
    llava_next: str
    qwen2_5_vl: str


class SuiteSettings(_Section):
    """``suite`` (``conf/suite/<name>.yaml``): the plans ``eval`` compares by default."""

    description: str = ""
    plans: list[str] = Field(default_factory=list, description="plan presets, in order")
    skip_inapplicable: bool = Field(
        default=True, description="skip (with a note) a plan the model cannot run, e.g. CLS attention on Qwen2.5-VL"
    )


class CLIConfig(_Section):
    """The whole composed config (``plan`` is validated separately as a Plan)."""

    plan: dict[str, Any]
    model: ModelSettings
    task: TaskSettings
    suite: SuiteSettings = SuiteSettings()
    plans: list[str] | None = None
    out_dir: str | None = None
    prompts: Prompts
    demo: DemoSettings = DemoSettings()
    run: RunSettings = RunSettings()
    eval: EvalSettings = EvalSettings()
    bench: BenchSettings = BenchSettings()
    flops: FlopsSettings = FlopsSettings()
    viz: VizSettings = VizSettings()


@dataclass
class Context:
    """A validated invocation: the config, which preset each group chose, and the overrides."""

    command: str
    cfg: CLIConfig
    raw: dict[str, Any]
    choices: dict[str, str]
    overrides: list[str]

    @property
    def plan_modified(self) -> bool:
        return any(o.lstrip("+~").startswith("plan.") for o in self.overrides)

    def overridden(self, group: str) -> bool:
        """Whether the command line chose ``group=...`` or changed ``group.<key>``."""
        return any(o.lstrip("+~").startswith((f"{group}=", f"{group}.")) for o in self.overrides)

    @property
    def plan_name(self) -> str:
        name = self.choices.get("plan") or "plan"
        return f"{name}*" if self.plan_modified else name

    @property
    def model_name(self) -> str:
        return self.cfg.model.name or self.choices.get("model") or self.cfg.model.arch

    def template(self, loaded) -> str:
        """The prompt template of ``loaded``: its conf's ``prompt`` (``chat_template``: rendered
        from its processor), else ``prompts.<arch>``."""
        return loaded.prompt_template(getattr(self.cfg.prompts, self.cfg.model.arch))


def compose_config(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose ``conf/config.yaml`` with Hydra overrides (no working-directory change, no logging
    set-up).  Returns the plain config and the option chosen in each config group."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from tokenreduce.core.presets import conf_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if not k.startswith("hydra")}
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True), choices
    except (HydraException, OmegaConfBaseException) as exc:
        raise TokenReduceError(f"invalid override(s) {list(overrides)}:\n{exc}") from None


def setup(command: str, overrides: Sequence[str]) -> Context:
    """Compose and validate the config of one command."""
    raw, choices = compose_config(overrides)
    try:
        cfg = CLIConfig.model_validate(raw)
    except ValidationError as exc:
        raise TokenReduceError(format_settings_error(exc, "", CLIConfig)) from None
    return Context(command, cfg, raw, choices, list(overrides))


def resolve_plans(ctx: Context, default_to_plan: bool = True, entries: Sequence[str] | None = None,
                  field: str = "plans") -> dict[str, Any]:
    """Display name -> validated :class:`~tokenreduce.core.plan.Plan` for ``entries`` (default:
    ``plans``, or ``[plan]`` when that is null)."""
    from tokenreduce.core.plan import parse_plan
    from tokenreduce.core.presets import load_preset, preset_names

    if entries is None:
        entries = ctx.cfg.plans if ctx.cfg.plans is not None else ([PLAN_ENTRY] if default_to_plan else [])
    known = preset_names("plan")
    plans: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if entry == PLAN_ENTRY:
            name = ctx.plan_name
            try:
                plan = parse_plan({"name": name, **{k: v for k, v in ctx.cfg.plan.items() if k != "name"}})
            except TokenReduceError as exc:
                raise TokenReduceError(str(exc).replace("invalid plan:", f"invalid plan (plan={ctx.choices.get('plan')}):", 1)) from None
        elif entry in known:
            name, plan = entry, load_preset(entry)
        else:
            raise TokenReduceError(
                f"{field}.{i}={entry!r}: unknown plan preset; known presets: {', '.join(known)} "
                f"(or {PLAN_ENTRY!r} for the composed plan with its plan.* overrides)"
            )
        if name in plans or name == "vanilla":
            raise TokenReduceError(f"{field}.{i}={entry!r}: the name {name!r} is used twice (or is reserved); list each plan once")
        plans[name] = plan
    return plans


# -- output ----------------------------------------------------------------------------------------
def out_dir(ctx: Context) -> Path:
    """The command's output folder (created): ``out_dir``, or a fresh ``outputs/<command>/<time>``."""
    if ctx.cfg.out_dir:
        path = Path(ctx.cfg.out_dir).expanduser()
    else:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        path = Path("outputs") / ctx.command / stamp
        n = 1
        while path.exists():
            path = Path("outputs") / ctx.command / f"{stamp}-{n}"
            n += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf become None, tensors lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, BaseModel):
        return _jsonable(obj.model_dump(mode="json"))
    return obj


def write_outputs(ctx: Context, folder: Path, results: dict[str, Any], plans: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (resolved, validated) and ``results.json`` into ``folder``."""
    import yaml

    from tokenreduce import __version__

    resolved = ctx.cfg.model_dump(mode="json")
    if plans is not None:
        resolved["resolved_plans"] = {name: p.model_dump(mode="json", exclude_defaults=True) for name, p in plans.items()}
    resolved["choices"] = ctx.choices
    resolved["overrides"] = ctx.overrides
    resolved["command"] = ctx.command
    (folder / "config.yaml").write_text(yaml.safe_dump(_jsonable(resolved), sort_keys=False, allow_unicode=True))
    meta = {"command": ctx.command, "overrides": ctx.overrides, "choices": ctx.choices, "tokenreduce": __version__,
            "torch": torch.__version__, "created": _dt.datetime.now().isoformat(timespec="seconds")}
    (folder / "results.json").write_text(json.dumps(_jsonable({"meta": meta, **results}), indent=1, allow_nan=False) + "\n")


# -- helpers ---------------------------------------------------------------------------------------
def _load(ctx: Context):
    from tokenreduce.models import load_model

    return load_model(ctx.cfg.model, name=ctx.model_name)


def _picture(path: str | None, size: list[int] | None, seed: int):
    from PIL import Image

    from tokenreduce.testing.tiny import make_image

    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise TokenReduceError(f"image file {path!r} not found")
        with Image.open(p) as im:
            return im.convert("RGB")
    return make_image(seed, tuple(size or _DEFAULT_PICTURE))


def _trace_rows(trace, sample: int = 0) -> list[list[str]]:
    rows = []
    for st in trace.stages:
        kept = st.kept[sample]
        shown = ", ".join(map(str, kept[:12])) + (", ..." if len(kept) > 12 else "")
        rows.append([str(st.stage), str(st.layer), f"{st.tokens_before[sample]} -> {st.tokens_after[sample]}",
                     f"{st.visual_before[sample]} -> {st.visual_after[sample]}", f"{st.seconds * 1e3:.1f}", shown])
    return rows


def _trace_dict(trace) -> dict[str, Any]:
    return {
        "n_layers": trace.n_layers,
        "original_visual": trace.original_visual,
        "visual_per_layer": [trace.visual_per_layer(b) for b in range(len(trace.original_visual))],
        "layer_average": [trace.layer_average(b) for b in range(len(trace.original_visual))],
        "stages": [{"stage": st.stage, "layer": st.layer, "tokens_before": st.tokens_before, "tokens_after": st.tokens_after,
                    "visual_before": st.visual_before, "visual_after": st.visual_after, "seconds": st.seconds, "kept": st.kept}
                   for st in trace.stages],
    }


def _progress_note(ctx: Context, folder: Path, extra: Sequence[str] = ()) -> None:
    files = ["config.yaml", "results.json", *extra]
    print(f"wrote {', '.join(str(folder / f) for f in files)}")


# -- commands ----------------------------------------------------------------------------------------
def cmd_list(argv: Sequence[str]) -> int:
    from tokenreduce.core.presets import conf_dir, preset_names
    from tokenreduce.core.registry import list_components

    folder = None
    for arg in argv:
        if arg.startswith("out_dir="):
            folder = Path(arg.split("=", 1)[1]).expanduser()
        else:
            raise TokenReduceError(f"list takes no overrides except out_dir=DIR; got {arg!r}")
    components = list(list_components())
    rows = [[c["kind"], c["name"], c["origin"], c["summary"]] for c in components]
    print(format_table(rows, ["kind", "name", "origin", "summary"]))
    groups = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_"))
    presets: dict[str, list[dict[str, str]]] = {}
    for group in groups:
        entries = []
        for name in preset_names(group):
            entries.append({"name": name, "about": _preset_summary(conf_dir() / group / f"{name}.yaml")})
        presets[group] = entries
    for group, entries in presets.items():
        print(f"\n{group} presets (conf/{group}, use {group}=<name>):")
        print(format_table([[e["name"], e["about"]] for e in entries], ["name", "about"]))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {"components": components, "presets": presets}
        (folder / "results.json").write_text(json.dumps(_jsonable(data), indent=1) + "\n")
        print(f"wrote {folder / 'results.json'}")
    return 0


def _preset_summary(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "(unreadable)"
    if not isinstance(data, dict):
        return ""
    for key in ("description",):
        if data.get(key):
            return str(data[key])
    bits = [f"{k}: {data[k]}" for k in ("kind", "arch", "name", "text_layers") if data.get(k) is not None]
    return ", ".join(bits)


def cmd_plans(argv: Sequence[str]) -> int:
    import argparse

    from tokenreduce.core.presets import load_preset, preset_names

    parser = argparse.ArgumentParser(prog="tokenreduce plans", description="keep counts and layer averages of presets")
    parser.add_argument("names", nargs="*", help="presets (default: all)")
    parser.add_argument("--depth", type=int, default=32, help="decoder layers (LLaVA-1.5-7B: 32)")
    parser.add_argument("--visual", type=int, default=576, help="visual tokens entering the LLM (LLaVA-1.5: 576)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.names or preset_names("plan"):
        plan = load_preset(name)
        layers = [s.layer for s in plan.stages]
        try:
            counts = plan.keep_counts(args.visual, args.depth)
            avg = f"{plan.layer_average_for(args.visual, args.depth):.3f}"
        except TokenReduceError as exc:
            counts, avg = "-", f"error: {exc}"
        rows.append([name, str(layers), str(counts), avg, f"{float(avg) / args.visual:.1%}" if avg[0].isdigit() else ""])
    print(f"depth {args.depth}, {args.visual} visual tokens (layer average = mean visual tokens per decoder layer)")
    print(format_table(rows, ["preset", "layers", "keep", "layer avg", "of visual"]))
    return 0


def _time_pair(model, inputs, plan, steps: int, repeats: int) -> tuple[float, float]:
    """Median ``generate()`` time without and with the plan, runs interleaved (after one warm-up
    of each) so that machine noise hits both alike."""
    import tokenreduce

    def once() -> float:
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return time.perf_counter() - t0

    vanilla, reduced = [], []
    for i in range(repeats + 1):
        v = once()
        with tokenreduce.apply(model, plan):
            r = once()
        if i:  # the first pair is the warm-up
            vanilla.append(v)
            reduced.append(r)
    return statistics.median(vanilla), statistics.median(reduced)


def cmd_demo(overrides: Sequence[str]) -> int:
    import tokenreduce
    from tokenreduce.testing.tiny import build_tiny, make_inputs, make_processor

    if not any(o.lstrip("+~").startswith("model=") for o in overrides):
        overrides = ["model=tiny_llava", *overrides]  # the demo's own default model
    ctx = setup("demo", overrides)
    if ctx.cfg.plans is not None:
        raise TokenReduceError("demo runs one plan: use plan=<preset> (plans=[...] is for bench/eval/flops/viz)")
    plan = resolve_plans(ctx)[ctx.plan_name]
    mcfg, dcfg = ctx.cfg.model, ctx.cfg.demo
    if mcfg.kind != "tiny" or mcfg.arch != "llava":
        raise TokenReduceError(f"model.kind={mcfg.kind!r}, arch={mcfg.arch!r}: the demo runs on the tiny built-in LLaVA only (model=tiny_llava)")
    image_size, patch = mcfg.image_size or 56, mcfg.patch or 14
    attn = mcfg.attn_implementation if mcfg.attn_implementation != "auto" else "sdpa"
    model = build_tiny("llava", attn_implementation=attn, text_layers=mcfg.text_layers or 4, image_size=image_size,
                       patch=patch, seed=dcfg.seed)
    processor = make_processor("llava", image_size=image_size, patch=patch)
    inputs = make_inputs("llava", [dcfg.prompt], image_sizes=[(image_size, image_size)], seed=dcfg.seed, processor=processor)
    steps, repeats = dcfg.max_new_tokens, dcfg.repeats
    torch.manual_seed(dcfg.seed)

    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    with tokenreduce.apply(model, plan) as att:
        reduced = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    trace = att.trace
    t_vanilla, t_reduced = _time_pair(model, inputs, plan, steps, repeats)

    n_layers = trace.n_layers
    print(f"tiny LLaVA ({n_layers} decoder layers, {attn}, fp32, random weights) "
          f"with plan {plan.name}: {plan.description}")
    print(f"prompt: {dcfg.prompt!r}  ({inputs['input_ids'].shape[1]} tokens, {trace.original_visual[0]} visual)")
    per_layer = trace.visual_per_layer(0)
    stage_at = {st.layer: st for st in trace.stages}
    rows = []
    for layer, n in enumerate(per_layer):
        st = stage_at.get(layer)
        note = f"stage {st.stage}: {st.visual_before[0]} -> {st.visual_after[0]} ({st.seconds * 1e3:.1f} ms)" if st else ""
        rows.append([str(layer), str(n), f"{n / max(1, trace.original_visual[0]):.0%}", note])
    print(format_table(rows, ["layer", "visual tokens", "kept", "cut"]))
    print(f"layer average: {trace.layer_average(0):.2f} of {trace.original_visual[0]} visual tokens "
          f"(plan arithmetic: {plan.layer_average_for(trace.original_visual[0], n_layers):.2f})")
    same = torch.equal(vanilla, reduced)
    print(f"generated tokens identical to vanilla: {same}")
    print(f"generate({steps} tokens), median of {repeats} interleaved runs: vanilla {t_vanilla * 1e3:.1f} ms, "
          f"reduced {t_reduced * 1e3:.1f} ms ({t_vanilla / t_reduced:.2f}x)")
    print("(a tiny random-weight model: the timing shows the overhead of the hooks, not real speed-ups)")
    return 0


def cmd_run(overrides: Sequence[str]) -> int:
    import tokenreduce
    from tokenreduce.measure.tasks import format_prompt

    ctx = setup("run", overrides)
    if ctx.cfg.plans is not None:
        raise TokenReduceError("run uses one plan: use plan=<preset> (plans=[...] is for bench/eval/flops/viz)")
    plan = resolve_plans(ctx)[ctx.plan_name]
    rcfg = ctx.cfg.run
    loaded = _load(ctx)
    adapter, compiled = tokenreduce.compile_for(loaded.model, plan)
    if loaded.processor is not None:
        prompt = rcfg.prompt or format_prompt(ctx.template(loaded), rcfg.question, ctx.cfg.task.question_format)
        inputs = loaded.processor_inputs([prompt], [_picture(rcfg.image, rcfg.image_size, rcfg.seed)])
        decode = lambda ids: loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    else:
        prompt = "(synthetic inputs: random pixels and token ids; kind config has no processor)"
        inputs = loaded.synthetic_inputs(1, seed=rcfg.seed)
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    kw = dict(max_new_tokens=rcfg.max_new_tokens, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    answers: dict[str, Any] = {}
    if rcfg.vanilla:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = loaded.model.generate(**inputs, **kw)
        answers["vanilla"] = {"answer": decode(out[0, n_prompt:].tolist()), "tokens": out[0, n_prompt:].tolist(),
                              "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    with adapter.attach(loaded.model, compiled) as att, torch.no_grad():
        out = loaded.model.generate(**inputs, **kw)
    answers[plan.name] = {"answer": decode(out[0, n_prompt:].tolist()), "tokens": out[0, n_prompt:].tolist(),
                          "seconds": time.perf_counter() - t0}
    trace = att.trace
    acc = _account(loaded, compiled.plan, trace)

    info = loaded.describe()
    print(f"model {info['name']} ({info['arch']}, {info['decoder_layers']} decoder layers, {info['dtype']}, "
          f"{info['attn_implementation']}, {info['weights']} weights) with plan {plan.name}: {plan.description}")
    print(f"prompt: {prompt!r}  ({n_prompt} tokens, {trace.original_visual[0]} visual)")
    for name, a in answers.items():
        print(f"{name:>12}: {a['answer']!r}  ({a['seconds'] * 1e3:.0f} ms)")
    per_layer = trace.visual_per_layer(0)
    print(format_table([[str(i), str(n)] for i, n in enumerate(per_layer)], ["layer", "visual tokens"]))
    print(f"layer average: {trace.layer_average(0):.2f} of {trace.original_visual[0]} visual tokens")
    if trace.stages:
        print("trace (kept = original sequence positions of the kept visual tokens):")
        print(format_table(_trace_rows(trace), ["stage", "layer", "tokens", "visual", "ms", "kept"]))
    if acc is not None:
        print(f"prefill FLOPs: {format_si(acc['flops_true'])} true, {format_si(acc['flops_paper'])} paper convention; "
              f"KV cache {acc['kv_mib']:.2f} MiB")
    folder = out_dir(ctx)
    write_outputs(ctx, folder, {"model": info, "prompt": prompt, "answers": answers, "trace": _trace_dict(trace),
                                "accounting": acc}, {plan.name: plan})
    _progress_note(ctx, folder)
    return 0


def _account(loaded, plan, trace) -> dict[str, Any] | None:
    try:
        from tokenreduce.measure.flops import account

        return account(loaded.model.config, plan=plan, trace=trace, kv_dtype_bytes=loaded.dtype.itemsize).to_dict()
    except Exception as exc:  # noqa: BLE001 - the answer stands without FLOPs
        log.warning("FLOP accounting failed: %s: %s", type(exc).__name__, exc)
        return None


def _suite_plans(ctx: Context, model) -> tuple[dict[str, Any], list[str]]:
    """The suite's plans that ``model`` can run, and a note for each one skipped."""
    import tokenreduce

    suite = ctx.cfg.suite
    plans = resolve_plans(ctx, entries=suite.plans, field="suite.plans")
    if not suite.skip_inapplicable:
        return plans, []
    usable, notes = {}, []
    for name, plan in plans.items():
        try:
            tokenreduce.compile_for(model, plan)
        except TokenReduceError as exc:
            notes.append(f"skipped {name} (suite.skip_inapplicable): {str(exc).splitlines()[0]}")
        else:
            usable[name] = plan
    return usable, notes


def cmd_eval(overrides: Sequence[str]) -> int:
    """``eval``: vanilla, then ``plans`` (or ``[plan]`` when a plan is chosen, else the suite)."""
    from tokenreduce.measure.tasks import evaluate, load_task

    ctx = setup("eval", overrides)
    use_suite = ctx.cfg.plans is None and not ctx.overridden("plan")
    plans = {} if use_suite else resolve_plans(ctx)
    loaded = _load(ctx)
    if loaded.processor is None:
        raise TokenReduceError(f"eval needs a model with a processor (kind tiny or pretrained); model {ctx.model_name!r} is kind {loaded.kind!r}")
    skipped: list[str] = []
    if use_suite:
        plans, skipped = _suite_plans(ctx, loaded.model)
    examples = load_task(ctx.cfg.task)
    task_info = ctx.cfg.task.model_dump(mode="json")
    if use_suite:
        task_info["suite"] = ctx.choices.get("suite")
    info = loaded.describe()
    print(f"{ctx.cfg.task.name} ({ctx.cfg.task.split}, {len(examples)} questions, seed {ctx.cfg.task.seed}) on "
          f"{info['name']} ({info['decoder_layers']} layers, {info['dtype']}, {info['weights']} weights): vanilla + "
          f"{len(plans)} plan(s)" + (f" of suite {ctx.choices.get('suite')!r}" if use_suite else ""), flush=True)
    result = evaluate(loaded, examples, plans, ctx.cfg.eval, template=ctx.template(loaded),
                      question_format=ctx.cfg.task.question_format, task_info=task_info)
    result.notes[:0] = skipped
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    folder = out_dir(ctx)

    about = (f"Model: {info['name']} ({info['decoder_layers']} decoder layers, {info['dtype']}, {info['weights']} weights); "
             f"torch {torch.__version__}, {ctx.cfg.eval.threads or torch.get_num_threads()} thread(s), {platform.machine()}; "
             f"FLOPs: mean prefill FLOPs per question (docs/measurement.md); s: wall time of each configuration's generate() calls.")
    (folder / "results.md").write_text(result.markdown(about))
    write_outputs(ctx, folder, {"model": info, **result.to_dict()}, plans)
    _progress_note(ctx, folder, ["results.md"])
    return 0


def cmd_bench(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.latency import benchmark
    from tokenreduce.measure.tasks import format_prompt

    ctx = setup("bench", overrides)
    plans = resolve_plans(ctx)
    bcfg = ctx.cfg.bench
    loaded = _load(ctx)
    synthetic = bcfg.synthetic if bcfg.synthetic is not None else loaded.processor is None
    if synthetic:
        inputs = loaded.synthetic_inputs(bcfg.batch_size, n_visual=bcfg.n_visual, n_text=bcfg.n_text, seed=bcfg.seed)
    else:
        if loaded.processor is None:
            raise TokenReduceError("bench.synthetic=false needs a model with a processor (kind tiny or pretrained)")
        prompt = format_prompt(ctx.template(loaded), bcfg.question, ctx.cfg.task.question_format)
        pictures = [_picture(bcfg.image, None, bcfg.seed + i) for i in range(bcfg.batch_size)]
        inputs = loaded.processor_inputs([prompt] * bcfg.batch_size, pictures)
    result = benchmark(loaded.model, inputs, plans, bcfg)
    info = loaded.describe()
    print(f"bench: {info['name']} ({info['arch']}, {info['decoder_layers']} decoder layers, hidden {info['hidden_size']}, "
          f"{info['dtype']}, {info['attn_implementation']}, {info['weights']} weights) on {info['device']}")
    print(f"inputs: batch {result.inputs['batch_size']}, {result.inputs['sequence_length']} tokens "
          f"({result.inputs['n_visual'][0]} visual, {result.inputs['n_text'][0]} text), {'synthetic' if synthetic else 'processor'}; "
          f"{bcfg.max_new_tokens} new tokens; median [min-max] of {bcfg.repeats} after {bcfg.warmup} warm-up")
    print(result.table())
    print(f"peak memory: {result.memory_method}")
    print("x = vanilla median / plan median; FLOP limit x = vanilla prefill FLOPs / plan prefill FLOPs (true convention)")
    for note in result.notes:
        print(f"note: {note}")
    folder = out_dir(ctx)
    write_outputs(ctx, folder, {"model": info, **result.to_dict()}, plans)
    _progress_note(ctx, folder)
    return 0


def cmd_flops(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.configs import hf_config
    from tokenreduce.measure.flops import account

    ctx = setup("flops", overrides)
    plans = resolve_plans(ctx)
    fcfg, mcfg = ctx.cfg.flops, ctx.cfg.model
    try:
        config = hf_config(mcfg.model_dump())
    except ValueError as exc:
        raise TokenReduceError(str(exc)) from None
    n_visual = fcfg.n_visual or mcfg.n_visual or getattr(config, "image_seq_length", None) or 576
    n_text = fcfg.n_text or mcfg.n_text or 60
    kw = dict(n_visual=n_visual, n_text=n_text, kv_dtype_bytes=fcfg.kv_dtype_bytes, include_vision=fcfg.include_vision,
              probe_backward_factor=fcfg.probe_backward_factor)
    base = account(config, None, **kw)
    results = {"vanilla": base}
    for name, plan in plans.items():
        results[name] = account(config, plan, **kw)
    rows = []
    for name, acc in results.items():
        r = acc.ratios(base)
        rows.append([name, f"{acc.layer_average:.1f}", format_si(acc.flops_true), format_si(acc.flops_paper),
                     format_si(acc.scorer_flops_true), f"{acc.kv_mib:.2f}", f"{r['flops_true']:.2f}",
                     f"{r['flops_paper']:.2f}", f"{r['kv_bytes']:.2f}"])
    depth = base.n_layers
    print(f"flops: {ctx.model_name} ({depth} decoder layers), {n_visual} visual + {n_text} text tokens, prefill of one sample, "
          f"KV at {fcfg.kv_dtype_bytes} bytes/element")
    print(format_table(rows, ["config", "layer avg", "FLOPs true", "FLOPs paper", "scorer FLOPs", "KV MiB",
                              "x true", "x paper", "x KV"]))
    print("true: 2 per multiply-add of every matmul (decoder on text + visual, LM head at 1 position"
          + (", vision tower + projector" if fcfg.include_vision else "") + ", scorer work);")
    print("paper: sum over layers of 4nd^2 + 2n^2d + 2ndm with n = visual tokens (PIO-FVLM/FastV convention); x = vanilla / plan")
    notes: dict[str, list[str]] = {}
    for name, acc in results.items():
        for item in acc.uncounted:
            key = re.sub(r"stages\.\d+\.", "stages.*.", item)
            if name not in notes.setdefault(key, []):
                notes[key].append(name)
    for item, names in notes.items():
        print(f"note ({', '.join(names)}): {item}")
    folder = out_dir(ctx)
    write_outputs(ctx, folder, {"n_visual": n_visual, "n_text": n_text,
                                "accounting": {name: acc.to_dict() for name, acc in results.items()},
                                "ratios": {name: acc.ratios(base) for name, acc in results.items()}}, plans)
    _progress_note(ctx, folder)
    return 0


def cmd_viz(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.viz import visualize

    ctx = setup("viz", overrides)
    plans = resolve_plans(ctx)
    if not plans:
        raise TokenReduceError("viz needs at least one plan (plan=<preset> or plans=[a,b,...])")
    vcfg = ctx.cfg.viz
    loaded = _load(ctx)
    if loaded.processor is None:
        raise TokenReduceError(f"viz needs a model with a processor to show its input (kind tiny or pretrained); "
                               f"model {ctx.model_name!r} is kind {loaded.kind!r}")
    paths = vcfg.images or [None]
    pictures = [_picture(p, vcfg.image_size, vcfg.seed + i) for i, p in enumerate(paths)]
    prompt = format_prompt(ctx.template(loaded), vcfg.question, ctx.cfg.task.question_format)
    figure, record = visualize(loaded, plans, pictures, [prompt] * len(pictures), vcfg)
    folder = out_dir(ctx)
    figure.save(folder / vcfg.file)
    print(f"viz: {len(plans)} plan(s) on {len(pictures)} image(s) of {ctx.model_name}; figure {figure.size[0]}x{figure.size[1]} px")
    for name, entries in record["plans"].items():
        counts = " | ".join(" > ".join([str(e["visual_before"])] + [f"L{s['layer']}:{s['visual_after']}" for s in e["stages"]])
                            for e in entries)
        print(f"  {name}: {counts}")
    write_outputs(ctx, folder, {"model": loaded.describe(), "images": [p or "synthetic" for p in paths],
                                "file": vcfg.file, **record}, plans)
    _progress_note(ctx, folder, [vcfg.file])
    return 0


# -- entry point --------------------------------------------------------------------------------------
class _StderrHandler(logging.Handler):
    """Library warnings to the current ``sys.stderr`` (looked up per record, so captured and
    replaced streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tokenreduce: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tokenreduce: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    handlers = {"demo": cmd_demo, "run": cmd_run, "eval": cmd_eval, "bench": cmd_bench, "flops": cmd_flops,
                "viz": cmd_viz, "list": cmd_list, "plans": cmd_plans}
    try:
        return handlers[command](rest)
    except TokenReduceError as exc:
        print(f"tokenreduce {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
