"""Adapters: the only code that touches a model.  One module per architecture, plus the shared
cut mechanics (:mod:`.decoder_cut`), masks (:mod:`.masks`) and signals (:mod:`.llama_signals`).

Built-in adapters register through the same pluggy hook as third-party ones.
"""

from tokenreduce.core.registry import hookimpl


@hookimpl
def tokenreduce_register(registry) -> None:
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter
    from .qwen2_5_vl import Qwen2_5_VLAdapter

    registry.adapter("llava", LlavaAdapter)
    registry.adapter("llava_next", LlavaNextAdapter)
    registry.adapter("qwen2_5_vl", Qwen2_5_VLAdapter)
