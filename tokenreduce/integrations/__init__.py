"""Bridges to other tools: each module here imports its tool and is loaded only by that tool.

- :mod:`tokenreduce.integrations.lmms_eval_plugin`: the ``tokenreduce`` model of lmms-eval,
  registered through lmms-eval's ``lmms_eval.models`` entry-point group (``docs/lmms-eval.md``).
- :mod:`tokenreduce.integrations.vllm`: a vLLM general plugin (entry-point group
  ``vllm.general_plugins``) registering reduced model classes that serve encoder-side plans
  (``docs/vllm.md``).
"""
