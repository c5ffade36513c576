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
    "check_out_dir",
    "compose_config",
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

    prompt: str = "USER: <image> what color is the shape? ASSISTANT:"
    max_new_tokens: int = Field(default=8, ge=1)
    repeats: int = Field(default=5, ge=1)
    seed: int = 0


class RunSettings(_Section):
    """``run``: one answer with and without the plan."""

    question: str = "what color is the shape?"
    prompt: str | None = Field(
        default=None, description="a whole prompt (with the image placeholder) instead of template + question"
    )
    image: str | None = Field(default=None, description="an image file; null: a synthetic picture")
    image_size: list[_Pixels] | None = Field(
        default=None, min_length=2, max_length=2, description="synthetic picture [width, height]"
    )
    max_new_tokens: int = Field(default=16, ge=1)
    vanilla: bool = True
    seed: int = 0


class FlopsSettings(_Section):
    """``flops``: accounting options (see ``tokenreduce.measure.flops.account``)."""

    n_visual: int | None = Field(default=None, ge=1)
    n_text: int | None = Field(default=None, ge=1)
    kv_dtype_bytes: Literal[1, 2, 4, 8] = 2
    include_vision: bool = True
    probe_backward_factor: float = Field(default=2.0, ge=0.0)


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
    prompts: dict[str, str] = Field(
        description="prompt template per architecture (model_type): the image placeholder and {question}"
    )
    demo: DemoSettings = DemoSettings()
    run: RunSettings = RunSettings()
    eval: EvalSettings = EvalSettings()
    bench: BenchSettings = BenchSettings()
    flops: FlopsSettings = FlopsSettings()
    viz: VizSettings = VizSettings()


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
        raise TokenReduceError(_override_error(exc.__cause__ or exc, list(overrides))) from None


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
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return (
            f"{where}: no {group} preset {name!r} (no conf/{exc.missing_cfg_file}.yaml, {exc.missing_cfg_file!r} not "
            f"found); known {group} presets: {', '.join(sorted(exc.options))}"
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
                raise TokenReduceError(
                    str(exc).replace("invalid plan:", f"invalid plan (plan={ctx.choices.get('plan')}):", 1)
                ) from None
        elif entry in known:
            name, plan = entry, load_preset(entry)
        else:
            raise TokenReduceError(
                f"{field}.{i}={entry!r}: unknown plan preset; known presets: {', '.join(known)} "
                f"(or {PLAN_ENTRY!r} for the composed plan with its plan.* overrides)"
            )
        if name in plans or name == "vanilla":
            raise TokenReduceError(
                f"{field}.{i}={entry!r}: the name {name!r} is used twice (or is reserved); list each plan once"
            )
        plans[name] = plan
    return plans
