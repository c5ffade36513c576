"""Adapters: the only code that touches a model.  One module per architecture, plus the shared
cut mechanics (:mod:`.decoder_cut`), masks (:mod:`.masks`) and signals (:mod:`.llama_signals`).

Built-in adapters register through the same pluggy hook as third-party ones.
"""

from tokenreduce.core.registry import hookimpl


@hookimpl
def tokenreduce_register(registry) -> None:
    from .llava import LlavaAdapter

    registry.adapter("llava", LlavaAdapter)
