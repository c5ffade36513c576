"""A third-party architecture plugin, as a user would write it: ``toy_llava``, a renamed copy of
LLaVA-1.5.

transformers learns the new ``model_type`` (a config class and a model class registered with its
Auto classes); tokenreduce learns it from one :class:`~tokenreduce.core.arch.ArchSpec` subclass
registered through the ``tokenreduce`` entry point.  Everything else (the adapter, the FLOP
formulas, the synthetic inputs, the tiny model, viz) is inherited from the LLaVA-1.5 spec.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from tokenreduce.adapters.llava.spec import LlavaSpec
from tokenreduce.core.registry import hookimpl

MODEL_TYPE = "toy_llava"


class ToyLlavaConfig(LlavaConfig):
    model_type = MODEL_TYPE


class ToyLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = ToyLlavaConfig


# exist_ok: the tests import this module afresh for every installation
AutoConfig.register(MODEL_TYPE, ToyLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(ToyLlavaConfig, ToyLlavaForConditionalGeneration, exist_ok=True)


class ToyLlavaSpec(LlavaSpec):
    """Toy LLaVA: LLaVA-1.5 under another model type."""

    model_type = MODEL_TYPE
    display_name = "Toy LLaVA"

    def model_class(self) -> type:
        return ToyLlavaForConditionalGeneration


@hookimpl
def tokenreduce_register(registry) -> None:
    registry.architecture(ToyLlavaSpec())
