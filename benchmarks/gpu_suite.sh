#!/usr/bin/env bash
# The GPU checks in one command: every CUDA test and the GPU benchmarks of benchmarks/, on one NVIDIA
# GPU, within a time budget (default 470 s: under 8 minutes on one H100), each step under its own timeout.
#
#   bash benchmarks/gpu_suite.sh            # run; logs and summary.txt in $OUT or ./gpu_suite_out
#   bash benchmarks/gpu_suite.sh --dry-run  # print the set-up and the steps, run nothing
#
# Set-up needs no network: it uses $PYTHON, else the repo's .venv, else a venv over the system's torch
# (packages imported from packages/*/src), else `make install`. Missing extras (pytest, numpy,
# diffusers, triton) are pip-installed against constraints.txt when PyPI answers; otherwise the steps
# that need them say so. A failing step does not stop the others; the exit code is 1 if set-up or any
# step failed or timed out. Environment: OUT, PYTHON, SUITE_BUDGET_S, INSTALL_TIMEOUT_S.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT_DIR="${OUT:-./gpu_suite_out}"
BUDGET_S="${SUITE_BUDGET_S:-470}"
INSTALL_TIMEOUT_S="${INSTALL_TIMEOUT_S:-150}"
EXTRAS=(pytest numpy diffusers triton)
START_S=$SECONDS

# Tests with CUDA-only paths: the kernels folder (its GPU paths run for real when CUDA is present,
# tests/kernels/conftest.py) and every other test file that skips without a CUDA GPU.
cuda_tests() {
  { echo tests/kernels
    grep -rlE "skipif\(not (torch\.cuda\.is_available\(\)|HAS_CUDA)" tests --include='test_*.py' | grep -v '^tests/kernels/'
  } | sort -u | tr '\n' ' '
}

# One step per line: name, timeout (s), key-number pattern (grep -E on the log), command ($PY is the
# interpreter). Sizes: the scripts' GPU defaults (1.3B, 480x832, 81 frames, bf16), fewer rounds; TI2V-5B at its
# 720P default (704x1280, 121 frames); the A14B pair at 480x832 with 21 frames under a 24 GB limit.
STEPS=(
  "cuda-tests|150|(passed|failed|error)|\$PY -m pytest -q -p no:cacheprovider $(cuda_tests)"
  "pipeline-step|90|^ *[0-9.]+ +[0-9.]+ +[0-9.]+|^50 steps|\$PY benchmarks/pipeline.py --steps 3"
  "dit-forward|100|^(ours|diffusers|diffsynth) |\$PY benchmarks/dit_forward.py --kernels --rounds 3"
  "vae-decode|100|^(ours|diffusers|diffsynth) +(untiled|tiled)|\$PY benchmarks/vae_decode.py --rounds 2 --no-memory"
  "offload|90|^(no offload|full offload \+ prefetch|fp8 storage, full offload \+ prefetch)|\$PY benchmarks/offload.py --repeats 2"
  "kernels-fp8|60|(rms_norm .*triton|fp8 )|\$PY benchmarks/kernels.py --repeats 10 --warmup 2"
  "attention|60|^1\.3B +480P|\$PY benchmarks/attention.py --repeats 3 --warmup 1"
  "pipeline-ti2v|90|^ *[0-9.]+ +[0-9.]+ +[0-9.]+|^50 steps|\$PY benchmarks/pipeline.py --model Wan2.2-TI2V-5B --steps 2"
  "experts|150|^(before|after) switch|^switch|\$PY benchmarks/experts.py --frames 21 --steps 6 --vram-limit 24"
  "compile|150|^ *[0-9.]+ +[0-9.]+ +[0-9.]+|\$PY benchmarks/compile.py --rounds 2"
)

# Fields of a step line: the key pattern may itself hold '|', so name/timeout come first, command last.
step_name() { echo "${1%%|*}"; }
step_timeout() { local rest="${1#*|}"; echo "${rest%%|*}"; }
step_command() { echo "${1##*|}"; }
step_pattern() { local rest="${1#*|}"; rest="${rest#*|}"; echo "${rest%|*}"; }

if (( DRY_RUN )); then
  echo "set-up: \$PYTHON, else .venv/bin/python, else a venv over the system torch, else make install;"
  echo "        pip install -c constraints.txt of missing ${EXTRAS[*]} when PyPI answers"
  for line in "${STEPS[@]}"; do
    printf 'step %-14s timeout %4ss: %s\n' "$(step_name "$line")" "$(step_timeout "$line")" "$(step_command "$line")"
  done
  exit 0
fi

mkdir -p "$OUT_DIR"
ROWS=()
FAILED=0
record() {  # name status seconds key
  ROWS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4")
  case "$2" in PASS|SKIP*) ;; *) FAILED=1 ;; esac
}

# ---- set-up -------------------------------------------------------------------------------------

setup() {
  local venv="${TMPDIR:-/tmp}/wan-gpu-suite-venv" missing=() mod
  if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
  elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
  elif python3 -c "import torch" 2>/dev/null; then
    if [[ -x "$venv/bin/python" ]] || python3 -m venv --system-site-packages "$venv"; then
      PY="$venv/bin/python"
    else
      PY=python3
    fi
  else
    echo "no torch on this machine: make install (needs PyPI)"
    timeout "$INSTALL_TIMEOUT_S" make install PYTHON=python3 || echo "make install failed or timed out"
    PY=.venv/bin/python
  fi
  export PY
  export PYTHONPATH="packages/wan-models/src:packages/wan-kernels/src:packages/wan-runtime/src:packages/wan-train/src:packages/wan-cli/src:tests${PYTHONPATH:+:$PYTHONPATH}"
  for mod in "${EXTRAS[@]}"; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
      || missing+=("$mod")
  done
  if (( ${#missing[@]} )); then
    echo "missing: ${missing[*]}; trying PyPI"
    timeout "$INSTALL_TIMEOUT_S" "$PY" -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 10 \
      -c constraints.txt "${missing[@]}" || echo "pip could not install ${missing[*]} (no PyPI?): steps needing them report it"
  fi
  "$PY" - <<'EOF'
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("pytest", "numpy", "diffusers", "diffsynth", "triton"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch")
print("device:", torch.cuda.get_device_name(0))
EOF
}

command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
setup >"$OUT_DIR/setup.log" 2>&1
SETUP_RC=$?
if (( SETUP_RC )); then
  record setup FAIL $((SECONDS - START_S)) "$(tail -n 1 "$OUT_DIR/setup.log" | cut -c1-150)"
else
  record setup PASS $((SECONDS - START_S)) "$(grep -E '^(device|torch|python)|MISSING' "$OUT_DIR/setup.log" | paste -sd ';' | cut -c1-150)"
fi

# ---- steps --------------------------------------------------------------------------------------

run_step() {
  local line="$1" name limit pattern command left log began rc status key
  name=$(step_name "$line"); limit=$(step_timeout "$line"); pattern=$(step_pattern "$line"); command=$(step_command "$line")
  left=$((BUDGET_S - (SECONDS - START_S)))
  if (( SETUP_RC )); then record "$name" "SKIP" 0 "set-up failed (see setup.log)"; return; fi
  if [[ "$name" == cuda-tests ]] && ! "$PY" -c "import pytest" 2>/dev/null; then
    record "$name" "SKIP" 0 "pytest missing and not installable"; return
  fi
  if (( left < 20 )); then record "$name" "SKIP" 0 "suite budget of ${BUDGET_S}s spent"; return; fi
  (( limit > left )) && limit=$left
  log="$OUT_DIR/$name.log"
  echo "\$ $command  (timeout ${limit}s)" >"$log"
  began=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "$command" >>"$log" 2>&1
  rc=$?
  case $rc in 0) status=PASS ;; 124|137) status=TIMEOUT ;; *) status="FAIL($rc)" ;; esac
  key=$(grep -E -- "$pattern" "$log" | tail -n 3 | tr -s ' ' | paste -sd ';' | cut -c1-150)
  [[ -z "$key" ]] && key=$(grep -v '^\s*$' "$log" | tail -n 1 | tr -s ' ' | cut -c1-150)
  record "$name" "$status" $((SECONDS - began)) "$key"
}

for line in "${STEPS[@]}"; do
  run_step "$line"
done

# ---- summary ------------------------------------------------------------------------------------

{
  printf '%-14s %-10s %6s  %s\n' step status seconds "key numbers"
  for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r name status secs key <<<"$row"
    printf '%-14s %-10s %6s  %s\n' "$name" "$status" "$secs" "$key"
  done
  echo "total $((SECONDS - START_S)) s; logs in $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
exit $FAILED
