"""Adapters: the only code that touches a model.  One folder per architecture (its adapter, its
:class:`~tokenreduce.core.arch.ArchSpec`, its tiny test model), plus the shared cut engine
(:mod:`.cut`), masks (:mod:`.masks`) and signals (:mod:`.llama_signals`, :mod:`.vision_signals`).
See ``docs/writing-an-adapter.md``.

Built-in architectures register through the same pluggy hook as third-party ones.
"""

from tokenreduce.core.registry import hookimpl


@hookimpl
def tokenreduce_register(registry) -> None:
    from .llava.spec import LlavaSpec
    from .llava_next.spec import LlavaNextSpec
    from .qwen2_5_vl.spec import Qwen2_5_VLSpec

    registry.architecture(LlavaSpec())
    registry.architecture(LlavaNextSpec())
    registry.architecture(Qwen2_5_VLSpec())
