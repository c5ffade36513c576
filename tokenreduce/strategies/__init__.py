"""Strategies: scorers and selectors, one module per method.

Built-in strategies register through the same pluggy hook as third-party ones.
"""

from tokenreduce.core.registry import hookimpl


@hookimpl
def tokenreduce_register(registry) -> None:
    from .dart import DARTSelector
    from .divprune import DivPruneSelector
    from .fastv import FastVScorer
    from .nms import NMSSelector
    from .norm import NormScorer
    from .pdrop import PDropScorer
    from .pio import PIOScorer
    from .random_select import RandomSelector
    from .sparsevlm import SparseVLMScorer, SparseVLMSelector
    from .topk import TopKSelector
    from .uniform import UniformSelector

    registry.scorer("norm", NormScorer)
    registry.scorer("pio", PIOScorer)
    registry.scorer("fastv", FastVScorer)
    registry.scorer("pdrop", PDropScorer)
    registry.scorer("sparsevlm", SparseVLMScorer)
    registry.selector("topk", TopKSelector)
    registry.selector("nms", NMSSelector)
    registry.selector("random", RandomSelector)
    registry.selector("uniform", UniformSelector)
    registry.selector("sparsevlm", SparseVLMSelector)
    registry.selector("dart", DARTSelector)
    registry.selector("divprune", DivPruneSelector)

    # encoder-side methods (vision-tower signals; stage at layer 0)
    from .holov import HoloVSelector
    from .pio_ve import PIOVESelector
    from .scope import SCOPESelector
    from .visionzip import CLSAttentionScorer, VisionZipSelector

    registry.scorer("vision_cls", CLSAttentionScorer)
    registry.selector("visionzip", VisionZipSelector)
    registry.selector("scope", SCOPESelector)
    registry.selector("holov", HoloVSelector)
    registry.selector("pio_ve", PIOVESelector)
