#!/usr/bin/env bash
# Everything fastner's CUDA code needs a GPU for, in one run that fits a 15-minute GPU lease
# (budget 11 min 30 s, each step capped by what is left): build the extension in place, the CUDA
# parity suites (tests/ops/crf/test_crf_cuda.py, tests/ops/rnn/test_rnn_cuda.py: parity with the reference and
# cuDNN, gradcheck, torch.library.opcheck on CUDA, streams, bad input), compute-sanitizer
# memcheck on a small case of every CUDA op, and the CUDA bench rows (benchmarks/*_cuda_bench.py).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT
#
# Writes to $OUT (default build/gpu-check): gpu_check.json (each step's status, seconds and
# detail, the environment), gpu_check.log (every step's output), junit.xml (the suites),
# sanitizer.log, crf_cuda.json and rnn_cuda.json (the bench rows). Exit status: 0 when every
# step passed, 1 when one failed, 3 when no GPU is visible (the steps before that still run: the
# build and the checks that need no device).
#
# The device machine (/work/.library/device) reaches no package index: it builds against its
# own python3 and torch (a CUDA 13 build), with nvcc, ninja, pytest and compute-sanitizer there.
# pytorch-crf (the CRF bench's baseline and one parity test) is not installed there: carry its
# wheel as .whl/ (`pip download --no-deps pytorch-crf==0.7.2 -d .whl`, ignored by git, named in
# the run's carry); this script installs .whl/*.whl into a private directory when present.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible GPU's, else
# 9.0), MAX_JOBS (default: the cores), GPU_CHECK_BUDGET_S (default 690), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/build/gpu-check}"
BUDGET="${GPU_CHECK_BUDGET_S:-690}"
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$OUT/gpu_check.log" STEPS="$SCRATCH/steps.tsv"
: >"$LOG"; : >"$STEPS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
START=$(date +%s)
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME CAP_SECONDS COMMAND...: runs under `timeout min(cap, time left)`, output to the
# log (and the terminal), one line in steps.tsv: name, status (passed, failed, timeout,
# skipped), seconds, detail (the last line of its output).
run_step() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -le 10 ]; then
    printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >>"$STEPS"; FAILED=1; return 1
  fi
  printf '\n===== %s (%s, limit %ss)\n' "$name" "$(date +%T)" "$limit" | tee -a "$LOG"
  local t0 status; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > >(tee -a "$LOG" "$SCRATCH/last.txt") 2>&1
  status=$?
  local took=$(( $(date +%s) - t0 )) word=passed
  sleep 0.2  # let tee flush
  local detail; detail=$(grep -v '^\s*$' "$SCRATCH/last.txt" | tail -n 1 | tr '\t' ' ' | cut -c1-300)
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then word=timeout; elif [ "$status" -ne 0 ]; then word=failed; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$word" "$took" "$detail" >>"$STEPS"
  printf '===== %s: %s in %ss\n' "$name" "$word" "$took" | tee -a "$LOG"
  [ "$word" = passed ] || FAILED=1
  [ "$word" = passed ]
}

write_json() {
  "$PY" - "$STEPS" "$OUT/gpu_check.json" "$1" <<'EOF'
import json, platform, subprocess, sys, time
steps_file, out, verdict = sys.argv[1:]
steps = []
for line in open(steps_file):
    name, status, seconds, detail = (line.rstrip("\n").split("\t") + [""])[:4]
    steps.append({"step": name, "status": status, "seconds": int(seconds), "detail": detail})
env = {"python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, gpu_visible=torch.cuda.is_available())
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())))
    import fastner
    env["fastner_backend"] = fastner.backend()
except Exception as err:  # the record of a broken run must still be written
    env["error"] = f"{type(err).__name__}: {err}"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as err:
    env["nvidia_smi"] = f"unavailable: {err}"
json.dump({"verdict": verdict, "environment": env, "steps": steps}, open(out, "w"), indent=1)
print(json.dumps({"verdict": verdict, "steps": [(s["step"], s["status"], s["seconds"]) for s in steps]}, indent=None))
EOF
}

# --- no device needed --------------------------------------------------------------------------
run_step environment 60 bash -c '
  echo "host: $(hostname), $(nproc) cores; python: $(command -v '"$PY"')"
  (nvidia-smi || echo "nvidia-smi: not available") 2>&1 | head -n 20
  (nvcc --version | tail -n 2) 2>&1
  (command -v compute-sanitizer || echo "compute-sanitizer: not on PATH") 2>&1
  '"$PY"' -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU visible:\", torch.cuda.is_available())"'

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  run_step "carried wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/gpu-check-site .whl/*.whl && export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the visible GPU's architecture: one, so the build is short
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
rm -f fastner/_C*.so fastner/_build_info.py
run_step "build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" 300 \
  env FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace
BUILT=$?
if [ "$BUILT" -eq 0 ]; then
  run_step "CUDA kernels registered" 60 "$PY" -c '
import fastner, json
info = fastner.backend()
print(json.dumps(info))
assert info["cuda_kernels"] == "built" and info["cpu"] == "fused", info'
fi

# --- a GPU from here on ------------------------------------------------------------------------
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>>"$LOG"; then
  msg="no CUDA device visible to torch (torch.cuda.is_available() is False): the CUDA suites, compute-sanitizer and the benches need a GPU and did not run"
  for name in "CUDA parity suites" "compute-sanitizer memcheck" "CRF CUDA bench" "RNN CUDA bench"; do
    printf '%s\tskipped\t0\t%s\n' "$name" "no GPU" >>"$STEPS"
  done
  echo "gpu_check: $msg" | tee -a "$LOG" >&2
  write_json "no GPU: $msg"
  exit 3
fi
[ "$BUILT" -eq 0 ] || { write_json "the build failed"; exit 1; }

run_step "CUDA parity suites" 330 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/junit.xml" \
  tests/ops/crf/test_crf_cuda.py tests/ops/rnn/test_rnn_cuda.py tests/test_backend.py

cat >"$SCRATCH/sanitize_case.py" <<'EOF'
# A small case of every CUDA op, for compute-sanitizer: CRF forward/backward and Viterbi (warp
# path K <= 32, block path K > 32, ragged lengths), and bidirectional LSTM/GRU/RNN layers forward
# and backward on both RNN paths.
import os
import torch
import fastner
from fastner.nn import CRF, GRU, LSTM, RNN

assert fastner.backend()["cuda"] == "fused", fastner.backend()
torch.manual_seed(0)
dev = "cuda"
for K in (5, 40):
    crf = CRF(K, batch_first=True).to(dev)
    em = torch.randn(3, 6, K, device=dev, requires_grad=True)
    lengths = torch.tensor([6, 2, 1], device=dev)
    mask = torch.arange(6, device=dev)[None, :] < lengths[:, None]
    tags = torch.randint(K, (3, 6), device=dev) * mask
    crf(em, tags, mask=mask, reduction="sum").backward()
    crf.decode(em.detach(), mask=mask)
for path in ("persistent", "stepwise"):
    os.environ["FASTNER_RNN_CUDA_PATH"] = path
    for cls in (LSTM, GRU, RNN):
        layer = cls(7, 9, batch_first=True, bidirectional=True).to(dev)
        x = torch.randn(3, 5, 7, device=dev, requires_grad=True)
        out, _ = layer(x, lengths=torch.tensor([5, 3, 1]))
        out.sum().backward()
torch.cuda.synchronize()
print("sanitize case: every op ran")
EOF
if command -v compute-sanitizer >/dev/null; then
  # --error-exitcode: any access error, API error or leak fails the step; its report is in sanitizer.log.
  run_step "compute-sanitizer memcheck" 150 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 50 \
    --log-file "$OUT/sanitizer.log" "$PY" "$SCRATCH/sanitize_case.py"
  tail -n 5 "$OUT/sanitizer.log" 2>/dev/null | tee -a "$LOG"
else
  printf '%s\tskipped\t0\t%s\n' "compute-sanitizer memcheck" "compute-sanitizer not on PATH" >>"$STEPS"; FAILED=1
fi

run_step "CRF CUDA bench" 90 "$PY" benchmarks/crf_cuda_bench.py "$OUT/crf_cuda.json"
run_step "RNN CUDA bench" 150 "$PY" benchmarks/rnn_cuda_bench.py "$OUT/rnn_cuda.json"

if [ "$FAILED" -eq 0 ]; then write_json "passed"; else write_json "failed: see steps"; fi
printf 'gpu_check: %ss of the %ss budget used\n' $(( $(date +%s) - START )) "$BUDGET"
exit "$FAILED"
