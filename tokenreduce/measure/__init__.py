"""Measurement: FLOPs and KV-cache accounting, latency benchmark, fidelity metrics.

``account`` / ``Accounting`` (:mod:`tokenreduce.measure.flops`) are re-exported lazily, so
importing a sibling module does not import the accounting code.
"""

from typing import Any

__all__ = ["Accounting", "account"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tokenreduce.measure import flops

        return getattr(flops, name)
    raise AttributeError(f"module 'tokenreduce.measure' has no attribute {name!r}")
