"""The command line's config: Hydra composition of ``conf/config.yaml``, its pydantic sections and
the :class:`Context` of one invocation (docs/cli.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import BenchSettings
from tokenreduce.measure.tasks import EvalSettings, TaskSettings
from tokenreduce.models import ModelSettings, format_settings_error
from tokenreduce.viz import VizSettings

__all__ = [
    "PLAN_ENTRY",
    "CLIConfig",
    "Context",
    "DemoSettings",
    "FlopsSettings",
    "RunSettings",
    "SuiteSettings",
    "compose_config",
    "resolve_plans",
    "setup",
]

PLAN_ENTRY = "plan"  # in `plans=[...]`: the composed `plan` with its overrides


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
    image_size: list[int] | None = Field(
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
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from tokenreduce.core.presets import conf_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = {
            k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if not k.startswith("hydra")
        }
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
