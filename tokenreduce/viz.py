"""Deprecated location (one release): the kept-token pictures now live in
:mod:`tokenreduce.measure.viz`, beside the other measurements."""

from tokenreduce.measure.viz import *  # noqa: F403
from tokenreduce.measure.viz import __all__  # noqa: F401
