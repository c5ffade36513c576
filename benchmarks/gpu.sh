#!/usr/bin/env bash
# The GPU benchmark of the 7B presets (benchmarks/gpu_bench.py) with its environment and a time limit.
#
#   benchmarks/gpu.sh [--install-flash-attn] [--limit-s SECONDS] [--out DIR] [gpu_bench.py options...]
#
# Checks CUDA (refuses to run without it unless --cpu-smoke is passed on) and flash-attn (installs
# nothing unless --install-flash-attn: `pip install flash-attn --no-build-isolation`), prints the
# environment (GPU, driver, torch, transformers, flash-attn), then runs
# `python benchmarks/gpu_bench.py --out DIR ...` under a wall-clock limit (default 480 s; the script's
# own --budget-s, default 60 s below the limit, skips parts that would start too late, and on the
# limit it is interrupted and writes what it finished).  The log goes to DIR/gpu.log; the results
# to DIR/report.json and DIR/report.md (default DIR: outputs/gpu of the repository).  Exit status: the script's
# (124 or 130 when the limit stopped it), 2 for a missing requirement.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
OUT="$ROOT/outputs/gpu"
LIMIT_S=480
INSTALL_FLASH=0
SMOKE=0
BUDGET_GIVEN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install-flash-attn) INSTALL_FLASH=1; shift ;;
    --limit-s)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+$ && "$2" -ge 60 ]] || { echo "gpu.sh: --limit-s needs a whole number of seconds >= 60" >&2; exit 2; }
      LIMIT_S="$2"; shift 2 ;;
    --out)
      [[ $# -ge 2 ]] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }
      OUT="$2"; [[ "$OUT" == /* ]] || OUT="$PWD/$OUT"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exec "$PYTHON" "$ROOT/benchmarks/gpu_bench.py" --help ;;
    *)
      [[ "$1" == "--cpu-smoke" ]] && SMOKE=1
      [[ "$1" == "--budget-s" || "$1" == --budget-s=* ]] && BUDGET_GIVEN=1
      ARGS+=("$1"); shift ;;
  esac
done
cd "$ROOT"

flash_version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('flash-attn'))" 2>/dev/null || true; }
FLASH="$(flash_version)"
if [[ -z "$FLASH" && $INSTALL_FLASH -eq 1 && $SMOKE -eq 0 ]]; then
  echo "installing flash-attn (pip install flash-attn --no-build-isolation) ..."
  "$PYTHON" -m pip install flash-attn --no-build-isolation
  FLASH="$(flash_version)"
fi

# one Python start-up: the requirements, CUDA (unless --cpu-smoke) and the versions
ENV_STATUS=0
ENV_TEXT="$("$PYTHON" - "$SMOKE" <<'PY'
import platform, sys
try:
    import torch, transformers, tokenreduce  # noqa: F401
except ImportError as exc:
    print(f"gpu.sh: {exc}: torch, transformers and tokenreduce must be importable (pip install -e .)")
    sys.exit(2)
if sys.argv[1] == "0" and not torch.cuda.is_available():
    print(f"gpu.sh: CUDA is not available to torch {torch.__version__}: run on a GPU machine with a CUDA build "
          "of torch, or pass --cpu-smoke for the CPU check of the script")
    sys.exit(2)
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
PY
)" || ENV_STATUS=$?
if [[ $ENV_STATUS -ne 0 ]]; then
  echo "$ENV_TEXT" >&2
  exit 2
fi

mkdir -p "$OUT"
{
  echo "== environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname))"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' \
      || echo "gpu: nvidia-smi failed"
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  echo "$ENV_TEXT"
  echo "flash-attn: ${FLASH:-not installed (flash_attention_2 parity is skipped; --install-flash-attn installs it)}"
  echo "limit: ${LIMIT_S} s wall clock; output: $OUT"
} | tee "$OUT/gpu.log"

if [[ $BUDGET_GIVEN -eq 0 ]]; then
  ARGS=(--budget-s "$((LIMIT_S - 60))" "${ARGS[@]}")
fi
STATUS=0
timeout --signal=INT --kill-after=30 "$LIMIT_S" \
  "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" "${ARGS[@]}" 2>&1 | tee -a "$OUT/gpu.log" || STATUS=${PIPESTATUS[0]}
if [[ $STATUS -eq 124 || $STATUS -eq 130 ]]; then
  echo "gpu.sh: stopped at the ${LIMIT_S} s limit; the report holds what finished" | tee -a "$OUT/gpu.log"
fi
echo "report: $OUT/report.md, $OUT/report.json; log: $OUT/gpu.log"
exit "$STATUS"
