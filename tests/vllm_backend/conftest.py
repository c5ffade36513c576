"""tests/vllm_backend: opt-in (marker ``vllm``), run in vLLM's own environment by ``scripts/vllm_env.sh --test``;
skipped where vLLM is not importable (the default suite and CI)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # harness.py
