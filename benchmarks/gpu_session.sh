#!/usr/bin/env bash
# Everything a session with a lent GPU measures, in one call of under 10 minutes (issue 25):
#
#   1. benchmarks/gpu_packing.py: the notebook's loop and ours on the GPU, then the study's grid at 1, 2,
#      4 and 8 trials per GPU (wall, aggregate images/s, peak memory per trial), 2 epochs a trial;
#   2. the study's whole protocol timed on the GPU (goal: under 60 s wall), through
#      benchmarks/pipeline.py --full: `python -m tuning.grid` (9 trials x 10 epochs, the 15-epoch final,
#      registration) with its default GPU share, and where its time went, phase by phase.
#
#   benchmarks/gpu_session.sh [DATA]      # from the repository root; DATA: the FER2013 tarball
#
# DATA defaults to $FER2013_DATA, else the first of shared/data/fer2013/fer2013-msambare.tar.gz,
# ../shared/data/fer2013/..., .device-data/fer2013-msambare.tar.gz that exists (the device tool sends
# the repository alone: copy the tarball into a git-ignored folder such as .device-data/ and carry it).
# It installs nothing: python3 must import torch (with a GPU), ray, mlflow and optuna. The lent
# H200 image (seen 2026-11) has torch but not ray, mlflow or optuna, and Ray's wheel alone (79 MB)
# is over the 64 MiB a call carries: bring them first (e.g. an installed, compressed site-packages
# unpacked to /tmp/site in an earlier call while the machine is warm) and set PYTHONPATH to it.
#
# Writes under $OUT (else /tmp/fer-gpu-session), at most 8 files: gpu.txt (nvidia-smi, versions),
# gpu_packing.log/.json, protocol.log/.json, summary.txt. Each step has its own time limit, so the
# second runs even when the first is cut short (its JSON keeps the shares it finished).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-/tmp/fer-gpu-session}"
PY="${PYTHON:-python3}"
PACKING_LIMIT_S="${PACKING_LIMIT_S:-330}"   # 1 + 2 + 3 well inside the tool's 600 s a call
PROTOCOL_LIMIT_S="${PROTOCOL_LIMIT_S:-210}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # no install: the driver and Ray's workers import from here
export PYTHONUNBUFFERED=1
# One decoded-data cache for every step: decoding (~5 s) is paid once, by the first.
export FER2013_CACHE="${FER2013_CACHE:-/tmp/fer-gpu-session-cache}"

fail() { echo "error: $*" | tee -a "$OUT/summary.txt" >&2; exit 2; }

DATA="${1:-${FER2013_DATA:-}}"
if [ -z "$DATA" ]; then
  for candidate in shared/data/fer2013/fer2013-msambare.tar.gz ../shared/data/fer2013/fer2013-msambare.tar.gz \
                   .device-data/fer2013-msambare.tar.gz; do
    [ -f "$candidate" ] && DATA="$candidate" && break
  done
fi
[ -n "$DATA" ] && [ -e "$DATA" ] || fail "no FER2013 data: pass the tarball's path (or set FER2013_DATA)"
DATA="$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")"

missing="$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "ray", "mlflow", "optuna") if importlib.util.find_spec(m) is None))
EOF
)"
[ -z "$missing" ] || fail "$PY cannot import: $missing (this script installs nothing; see its header)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch sees no CUDA GPU here (torch.cuda.is_available() is False)"

{ nvidia-smi; "$PY" -c "import torch, ray, mlflow, optuna; print('torch', torch.__version__, 'ray', ray.__version__, \
'mlflow', mlflow.__version__, 'optuna', optuna.__version__)"; echo "data $DATA"; nproc; } >"$OUT/gpu.txt" 2>&1

t0=$(date +%s)
timeout -k 10 "$PACKING_LIMIT_S" "$PY" benchmarks/gpu_packing.py --data "$DATA" --json "$OUT/gpu_packing.json" \
  >"$OUT/gpu_packing.log" 2>&1
packing_rc=$?
t1=$(date +%s)
timeout -k 10 "$PROTOCOL_LIMIT_S" "$PY" benchmarks/pipeline.py --full --warm-cache --no-sequential --data "$DATA" \
  --json "$OUT/protocol.json" >"$OUT/protocol.log" 2>&1
protocol_rc=$?
t2=$(date +%s)

{
  echo "gpu_packing: exit $packing_rc in $((t1 - t0)) s (124: cut at ${PACKING_LIMIT_S} s)"
  grep -E "^ *[0-9]+ trial\(s\)/GPU|default on this GPU" "$OUT/gpu_packing.log"
  echo "whole protocol: exit $protocol_rc in $((t2 - t1)) s (124: cut at ${PROTOCOL_LIMIT_S} s)"
  grep -E "^command wall time|^GPU share per trial|^plan:" "$OUT/protocol.log"
} >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
[ "$packing_rc" -eq 0 ] && [ "$protocol_rc" -eq 0 ]
