"""Strategies: scorers and selectors, one module per method (``docs/strategies/``).

Built-in strategies register through the same pluggy hook as third-party ones.  Each class is
also a plan component in Python, under its class name or a short one::

    from tokenreduce.strategies import NMS, PIO

    Stage(layer=2, keep=64, scorer=PIO(loss_positions=4), selector=NMS(threshold=0.8))
"""

from tokenreduce.core.registry import hookimpl

from .dart import DARTSelector
from .divprune import DivPruneSelector
from .fastv import FastVScorer
from .holov import HoloVSelector
from .nms import NMSSelector
from .norm import NormScorer
from .pdrop import PDropScorer
from .pio import PIOScorer
from .pio_ve import PIOVEQwenSelector, PIOVESelector
from .random_select import RandomSelector
from .scope import SCOPESelector
from .sparsevlm import SparseVLMScorer, SparseVLMSelector
from .topk import TopKSelector
from .uniform import UniformSelector
from .visionzip import CLSAttentionScorer, ReceivedAttentionScorer, VisionZipSelector

# short names for typed plans (SparseVLM and vision_cls keep their class names)
PIO = PIOScorer
FastV = FastVScorer
PDrop = PDropScorer
Norm = NormScorer
NMS = NMSSelector
TopK = TopKSelector
Random = RandomSelector
Uniform = UniformSelector
DART = DARTSelector
DivPrune = DivPruneSelector
VisionZip = VisionZipSelector
SCOPE = SCOPESelector
HoloV = HoloVSelector
PIOVE = PIOVESelector

#: registered name -> class, per kind (the names plans use)
SCORERS = {
    "norm": NormScorer,
    "pio": PIOScorer,
    "fastv": FastVScorer,
    "pdrop": PDropScorer,
    "sparsevlm": SparseVLMScorer,
    # encoder side (vision-tower signals; a stage at layer 0)
    "vision_cls": CLSAttentionScorer,
    "vision_attn": ReceivedAttentionScorer,
}
SELECTORS = {
    "topk": TopKSelector,
    "nms": NMSSelector,
    "random": RandomSelector,
    "uniform": UniformSelector,
    "sparsevlm": SparseVLMSelector,
    "dart": DARTSelector,
    "divprune": DivPruneSelector,
    # encoder side
    "visionzip": VisionZipSelector,
    "scope": SCOPESelector,
    "holov": HoloVSelector,
    "pio_ve": PIOVESelector,
    "pio_ve_qwen": PIOVEQwenSelector,
}

__all__ = [
    "PIOVEQwenSelector",
    "ReceivedAttentionScorer",
    "CLSAttentionScorer",
    "DART",
    "DARTSelector",
    "DivPrune",
    "DivPruneSelector",
    "FastV",
    "FastVScorer",
    "HoloV",
    "HoloVSelector",
    "NMS",
    "NMSSelector",
    "Norm",
    "NormScorer",
    "PDrop",
    "PDropScorer",
    "PIO",
    "PIOScorer",
    "PIOVE",
    "PIOVESelector",
    "Random",
    "RandomSelector",
    "SCOPE",
    "SCOPESelector",
    "SCORERS",
    "SELECTORS",
    "SparseVLMScorer",
    "SparseVLMSelector",
    "TopK",
    "TopKSelector",
    "Uniform",
    "UniformSelector",
    "VisionZip",
    "VisionZipSelector",
    "tokenreduce_register",
]


@hookimpl
def tokenreduce_register(registry) -> None:
    for name, cls in SCORERS.items():
        registry.scorer(name, cls)
    for name, cls in SELECTORS.items():
        registry.selector(name, cls)
