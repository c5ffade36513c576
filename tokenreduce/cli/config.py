"""The command line's config: Hydra composition of ``conf/config.yaml``, its pydantic sections and
the :class:`Context` of one invocation (docs/cli.md)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import BenchSettings
from tokenreduce.measure.tasks import EvalSettings, TaskSettings
from tokenreduce.measure.viz import VizSettings
from tokenreduce.models import ModelSettings, format_settings_error

__all__ = [
    "PLAN_ENTRY",
    "WRITES_OUTPUTS",
    "CLIConfig",
    "Context",
    "DemoSettings",
    "FlopsSettings",
    "RunSettings",
    "SuiteSettings",
    "check_components",
    "check_out_dir",
    "compose_config",
    "load_plan_file",
    "resolve_plans",
    "setup",
]

PLAN_ENTRY = "plan"  # in `plans=[...]`: the composed `plan` with its overrides
#: the commands that write config.yaml and results.json into out_dir (checked before any work)
WRITES_OUTPUTS = ("run", "eval", "bench", "flops", "viz")
_Pixels = Annotated[int, Field(ge=1)]


# -- settings sections ---------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoSettings(_Section):
    """``demo``: the README's main job."""

    prompt: str = Field(
        default="USER: <image> what color is the shape? ASSISTANT:",
        description="the whole prompt, with the image placeholder (adapted to the model's architecture)",
    )
    max_new_tokens: int = Field(default=8, ge=1, description="tokens per generate()")
    repeats: int = Field(default=5, ge=1, description="timed generate() pairs (vanilla, plan); the median is shown")
    seed: int = Field(default=0, description="seed of the synthetic picture and of a tiny model's weights")


class RunSettings(_Section):
    """``run``: one answer with and without the plan."""

    question: str = Field(default="what color is the shape?", description="the question put in the prompt template")
    prompt: str | None = Field(
        default=None, description="a whole prompt (with the image placeholder) instead of template + question"
    )
    image: str | None = Field(default=None, description="an image file; null: a synthetic picture")
    image_size: list[_Pixels] | None = Field(
        default=None, min_length=2, max_length=2, description="synthetic picture [width, height]"
    )
    max_new_tokens: int = Field(default=16, ge=1, description="greedy answer length limit")
    vanilla: bool = Field(default=True, description="also answer without the plan, for comparison")
    seed: int = Field(default=0, description="seed of the synthetic picture (and of synthetic inputs)")


class FlopsSettings(_Section):
    """``flops``: accounting options (see ``tokenreduce.measure.flops.account``)."""

    n_visual: int | None = Field(
        default=None, ge=1, description="visual tokens per sample; null: model.n_visual, else the config's"
    )
    n_text: int | None = Field(default=None, ge=1, description="text tokens per sample; null: model.n_text, else 60")
    kv_dtype_bytes: Literal[1, 2, 4, 8] = Field(
        default=2, description="bytes per KV-cache element (2: fp16/bf16, the papers' convention)"
    )
    include_vision: bool = Field(default=True, description="count the vision tower and projector in true FLOPs")
    probe_backward_factor: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="paper-convention FLOPs only: a gradient probe's (PIO's) backward charged as this many "
        "probe forwards; 0: the paper's rule (forward only), 2: the official profiler's backward_gamma. "
        "True FLOPs always count the backward as it runs",
    )


class SuiteSettings(_Section):
    """``suite`` (``conf/suite/<name>.yaml``): the plans ``eval`` compares by default."""

    description: str = Field(default="", description="what the suite compares (shown by tokenreduce list)")
    plans: list[str] = Field(default_factory=list, description="plan presets or plan files, in order")
    skip_inapplicable: bool = Field(
        default=True, description="skip (with a note) a plan the model cannot run, e.g. CLS attention on Qwen2.5-VL"
    )


class CLIConfig(_Section):
    """The whole composed config (``plan`` is validated separately as a Plan)."""

    plan: dict[str, Any] = Field(description="the plan (plan=<preset or file.yaml>; plan.<key>=<value> changes it)")
    model: ModelSettings = Field(description="the model (model=<preset>; model.<key>=<value> changes it)")
    task: TaskSettings = Field(description="the task eval runs (task=<preset>)")
    suite: SuiteSettings = Field(default=SuiteSettings(), description="the plans eval compares by default")
    plans: list[str] | None = Field(
        default=None,
        description="plans to compare: presets, plan files, or 'plan' (the composed plan); "
        "null: [plan] (eval: the suite)",
    )
    out_dir: str | None = Field(default=None, description="output folder; null: outputs/<command>/<date>_<time>")
    prompts: dict[str, str] = Field(
        description="prompt template per architecture (model_type): the image placeholder and {question}"
    )
    demo: DemoSettings = Field(default=DemoSettings(), description="tokenreduce demo")
    run: RunSettings = Field(default=RunSettings(), description="tokenreduce run")
    eval: EvalSettings = Field(default=EvalSettings(), description="tokenreduce eval")
    bench: BenchSettings = Field(default=BenchSettings(), description="tokenreduce bench")
    flops: FlopsSettings = Field(default=FlopsSettings(), description="tokenreduce flops")
    viz: VizSettings = Field(default=VizSettings(), description="tokenreduce viz")


# -- one invocation ------------------------------------------------------------------------------
@dataclass
class Context:
    """A validated invocation: the config, which preset each group chose, and the overrides."""

    command: str
    cfg: CLIConfig
    raw: dict[str, Any]
    choices: dict[str, str]
    overrides: list[str]

    @property
    def plan_changes(self) -> list[str]:
        """The ``plan.<key>`` overrides that change what the plan does (not its name or description)."""
        keys = ("plan.name=", "plan.description=")
        return [o for o in self.overrides if o.lstrip("+~").startswith("plan.") and not o.lstrip("+~").startswith(keys)]

    @property
    def plan_modified(self) -> bool:
        return any(o.lstrip("+~").startswith("plan.") for o in self.overrides)

    @property
    def plan_label(self) -> str:
        """How the command line chose the plan, for messages: ``plan=<preset>`` or ``plan=<file path>``,
        with ``*`` when ``plan.*`` overrides changed it."""
        from tokenreduce.core.conf import file_option

        given = [o.split("=", 1)[1] for o in self.overrides if o.lstrip("+").startswith("plan=")]
        label = given[-1] if given and file_option(given[-1]) is not None else self.choices.get("plan")
        return f"plan={label}" + ("*" if self.plan_changes else "")

    def _plan_key_set(self, key: str) -> bool:
        return any(o.lstrip("+~").startswith(f"plan.{key}=") for o in self.overrides)

    def overridden(self, group: str) -> bool:
        """Whether the command line chose ``group=...`` or changed ``group.<key>``."""
        return any(o.lstrip("+~").startswith((f"{group}=", f"{group}.")) for o in self.overrides)

    @property
    def plan_name(self) -> str:
        """The composed plan's name: ``plan.name=`` when the command line sets it; else the preset's
        name (a plan file's stem), unless ``plan.*`` overrides changed what it does: then a name
        derived from its stages (:func:`~tokenreduce.core.plan.derived_name`, e.g. ``fastv@2:32``)."""
        if self._plan_key_set("name") and self.cfg.plan.get("name"):
            return str(self.cfg.plan["name"])
        name = self.choices.get("plan") or "plan"
        if not self.plan_changes:
            return name
        from tokenreduce.core.plan import derived_name, parse_plan

        try:
            return derived_name(parse_plan({k: v for k, v in self.cfg.plan.items() if k != "name"}))
        except TokenReduceError:  # invalid: resolve_plans reports it
            return f"{name}*"

    def composed_plan(self) -> Any:
        """The validated :class:`~tokenreduce.core.plan.Plan` of ``plan`` with its overrides, named
        by :attr:`plan_name`; a preset changed by overrides is described by what it now does."""
        from tokenreduce.core.plan import derived_description, parse_plan

        choice = self.choices.get("plan")
        data = {**self.cfg.plan, "name": self.plan_name}
        try:
            plan = parse_plan(data)
        except TokenReduceError as exc:
            raise TokenReduceError(str(exc).replace("invalid plan:", f"invalid plan ({self.plan_label}):", 1)) from None
        if (self.plan_changes and not self._plan_key_set("description")) or not plan.description:
            changed = f" (plan={choice} changed by {' '.join(self.plan_changes)})" if self.plan_changes else ""
            plan = plan.model_copy(update={"description": derived_description(plan) + changed})
        return plan

    @property
    def model_name(self) -> str:
        return self.cfg.model.name or self.choices.get("model") or self.cfg.model.arch

    def load(self):
        """The model of ``model`` (:func:`tokenreduce.models.load_model`)."""
        from tokenreduce.models import load_model

        return load_model(self.cfg.model, name=self.model_name)

    def template(self, loaded) -> str:
        """The prompt template of ``loaded``: its conf's ``prompt`` (``chat_template``: rendered
        from its processor), else ``prompts.<arch>``, else the architecture's default prompt."""
        from tokenreduce.core.registry import get_registry

        arch = self.cfg.model.arch
        default = self.cfg.prompts.get(arch) or get_registry().spec_for(arch).default_prompt()
        return loaded.prompt_template(default)


def compose_config(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose ``conf/config.yaml`` with Hydra overrides (no working-directory change, no logging
    set-up).  Returns the plain config and the option chosen in each config group."""
    from tokenreduce.core.conf import compose_with_choices
    from tokenreduce.core.errors import PlanError

    try:
        # Hydra's composition without its process-wide state (a user's own Hydra app is unaffected)
        return compose_with_choices(list(overrides))
    except PlanError as exc:
        if exc.__cause__ is None:  # tokenreduce's own message (a plan file that does not exist)
            raise TokenReduceError(str(exc)) from None
        raise TokenReduceError(_override_error(exc.__cause__, list(overrides))) from None


def _override_error(exc: Exception, overrides: list[str]) -> str:
    """Hydra's or OmegaConf's error on ``overrides`` as one line that starts with the override at
    fault (found by parsing each alone, or by the key the message names)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    culprit = None
    if isinstance(exc, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_overrides([override])
            except OverrideParseException:
                culprit = override
                break
    text = str(exc).split("Config search path:")[0]
    if culprit is None:
        named = re.findall(r"'([^'\s]+)'", text) + re.findall(r"full_key: (\S+)", text)
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if override in text or any(n in (key, key.replace(".", "/")) or n.startswith(key + "/") for n in named):
                culprit = override
                break
    where = f"invalid override {culprit!r}" if culprit else f"invalid override(s) {overrides}"
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        from tokenreduce.core.conf import did_you_mean

        group, _, name = exc.missing_cfg_file.rpartition("/")
        suggestion = did_you_mean(name, exc.options)
        return (
            f"{where}: no {group} preset {name!r}{f' ({suggestion})' if suggestion else ''} (no "
            f"conf/{exc.missing_cfg_file}.yaml, {exc.missing_cfg_file!r} not found); known {group} presets: "
            f"{', '.join(sorted(exc.options))} (or a {group} file: {group}=path/to/file.yaml)"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("See https://hydra.cc")]
    if isinstance(exc, OverrideParseException):
        lines.append(
            "(Hydra override syntax: key=value; quote a value with special characters, e.g. 'key=\"{question}?\"')"
        )
    if lines and lines[0].startswith("Could not override") and culprit:
        key = culprit.lstrip("+~").split("=", 1)[0]
        return f"{where}: {key!r} is not a key of the config (check the spelling; to add a new key use +{culprit.lstrip('+~')})"
    return f"{where}: {' '.join(lines) or type(exc).__name__}"


def setup(command: str, overrides: Sequence[str]) -> Context:
    """Compose and validate the config of one command, and check its inputs and output folder
    before any work: the image files it reads, the output folder of a command that writes one
    (:func:`check_out_dir`)."""
    raw, choices = compose_config(overrides)
    try:
        cfg = CLIConfig.model_validate(raw)
    except ValidationError as exc:
        raise TokenReduceError(format_settings_error(exc, "", CLIConfig)) from None
    _check_inputs(command, cfg)
    if command in WRITES_OUTPUTS:
        check_out_dir(cfg.out_dir, command)
    return Context(command, cfg, raw, choices, list(overrides))


def check_out_dir(value: str | None, command: str, key: str = "out_dir") -> Path:
    """Check, before any work, that the output folder can be written: ``value`` (or the default
    ``outputs/<command>`` under the working directory) is a folder or can be created as one, and
    a file can be written there.  Nothing is left behind (the folder itself is created when the
    outputs are written).  Returns the folder.

    Raises:
        TokenReduceError: the path is a file, lies under a file, or cannot be written (named).
    """
    path = Path(value).expanduser() if value else Path("outputs") / command
    shown = f"{key}={value!r}" if value else f"{key} (default outputs/{command}/<date>_<time>)"
    existing = path  # the folder itself, or the nearest existing folder above it
    try:
        if path.exists() and not path.is_dir():
            raise TokenReduceError(f"{shown} is a file, not a folder; give a folder (created when missing)")
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise TokenReduceError(
                f"{shown}: the folder cannot be created because {existing} is a file; give a folder (created when "
                "missing)"
            )
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise TokenReduceError(
            f"{shown}: cannot write into {existing} ({exc.strerror or exc}); choose a writable folder"
        ) from None
    return path


def _check_inputs(command: str, cfg: CLIConfig) -> None:
    """The files and sizes a command reads, checked before the model is loaded."""
    images: list[tuple[str, str]] = []
    if command == "run" and cfg.run.image:
        images.append(("run.image", cfg.run.image))
    elif command == "bench" and cfg.bench.image:
        images.append(("bench.image", cfg.bench.image))
    elif command == "viz":
        images += [(f"viz.images.{i}", path) for i, path in enumerate(cfg.viz.images)]
        if cfg.viz.image_size is not None and min(cfg.viz.image_size) < 1:
            raise TokenReduceError(
                f"viz.image_size={cfg.viz.image_size}: width and height must be integers >= 1 (pixels)"
            )
        _check_figure_file(cfg.viz.file)
    for key, path in images:
        _check_image(key, path)


def _check_image(key: str, path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        what = "a folder, not an image file" if file.is_dir() else "no such file"
        raise TokenReduceError(f"{key}={path!r}: {what}")
    try:
        with Image.open(file) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TokenReduceError(f"{key}={path!r}: not an image PIL can read ({exc})") from None


def _check_figure_file(name: str) -> None:
    from PIL import Image

    Image.init()
    suffix = Path(name).suffix.lower()
    if not name or Path(name).name != name or name in (".", ".."):
        raise TokenReduceError(
            f"viz.file={name!r}: a file name in the output folder (no folder part), e.g. kept_tokens.png"
        )
    if suffix not in Image.registered_extensions():
        raise TokenReduceError(f"viz.file={name!r}: the name must end in an image extension (.png, .jpg, ...)")


def resolve_plans(
    ctx: Context, default_to_plan: bool = True, entries: Sequence[str] | None = None, field: str = "plans"
) -> dict[str, Any]:
    """Display name -> validated :class:`~tokenreduce.core.plan.Plan` for ``entries`` (default:
    ``plans``, or ``[plan]`` when that is null).  An entry is a preset (built-in or a plugin's), a
    plan file (``path/to/my_plan.yaml``, named after its stem) or ``plan`` (the composed plan).
    Every plan's components are looked up and their settings validated here, before any model is
    loaded."""
    from tokenreduce.core.conf import did_you_mean, file_option
    from tokenreduce.core.presets import load_preset, preset_names

    if entries is None:
        entries = ctx.cfg.plans if ctx.cfg.plans is not None else ([PLAN_ENTRY] if default_to_plan else [])
    known = preset_names("plan")
    plans: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        where = f"{field}.{i}={entry!r}"
        if entry == PLAN_ENTRY:
            name, plan = ctx.plan_name, ctx.composed_plan()
            where = ctx.plan_label
        elif file_option(entry) is not None:
            plan = load_plan_file(entry, where)
            name = plan.name
        elif entry in known:
            name, plan = entry, load_preset(entry)
        else:
            suggestion = did_you_mean(entry, [*known, PLAN_ENTRY])
            raise TokenReduceError(
                f"{where}: unknown plan preset{f' ({suggestion})' if suggestion else ''}; known presets: "
                f"{', '.join(known)} (or {PLAN_ENTRY!r} for the composed plan with its plan.* overrides, or a plan "
                "file path ending in .yaml)"
            )
        check_components(plan, where)
        if name in plans or name == "vanilla":
            raise TokenReduceError(f"{where}: the name {name!r} is used twice (or is reserved); list each plan once")
        plans[name] = plan
    return plans


def load_plan_file(entry: str, where: str) -> Any:
    """The validated :class:`~tokenreduce.core.plan.Plan` of the YAML file ``entry`` (composed like a
    preset, so a file may use Hydra's defaults list), named after the file's stem and described
    by its stages when it has no ``description``.  Errors start with ``where``."""
    from tokenreduce.core.conf import compose_with_choices, file_option
    from tokenreduce.core.errors import PlanError
    from tokenreduce.core.plan import derived_description, parse_plan

    path = file_option(entry)
    assert path is not None, entry
    try:
        data, _ = compose_with_choices([f"plan={entry}"])
    except PlanError as exc:
        if exc.__cause__ is None:
            raise TokenReduceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
        detail = _override_error(exc.__cause__, [f"plan={entry}"]).split(": ", 1)[-1]
        raise TokenReduceError(f"{where}: {detail}") from None
    body = data.get("plan")
    if not isinstance(body, dict):
        raise TokenReduceError(f"{where}: the file holds no plan mapping (stages, positions, description, ...)")
    try:
        plan = parse_plan({**body, "name": path.stem})
    except TokenReduceError as exc:
        raise TokenReduceError(str(exc).replace("invalid plan:", f"invalid plan ({where}):", 1)) from None
    if not plan.description:
        plan = plan.model_copy(update={"description": derived_description(plan)})
    return plan


def check_components(plan: Any, where: str) -> None:
    """Look up every scorer and selector of ``plan`` in the registry and validate their settings
    (no model needed), so that a misspelt name stops the command before the model loads.

    Raises:
        TokenReduceError: an unknown name (with the closest known ones) or a bad setting, after ``where``.
    """
    from tokenreduce.core.plan import build_plan

    try:
        build_plan(plan)
    except TokenReduceError as exc:
        raise TokenReduceError(f"{where}: {exc}") from None
