#!/usr/bin/env bash
# The GPU wheel, built and smoke-tested without a GPU: build it against the pip CUDA torch (nvcc
# and the nvidia-* packages' headers and libraries; cuda_build.py), check its name and its
# links, install it with the CUDA torch into a fresh venv, import it from outside the source tree
# with LD_BIND_NOW=1 (every symbol resolved at load time) and run the CPU op tests against the
# installed copy. What this cannot check: the CUDA kernels running (benchmarks/gpu_check.sh does
# that on a GPU machine).
#
# Environment: GPU_WHEEL_TORCH (default 2.14.1, CUDA 13.0 on this machine's package mirror),
# TORCH_CUDA_ARCH_LIST (default 9.0 here, to fit CI's time; releases build setup.py's default
# 8.0;8.6;9.0+PTX), MAX_JOBS (default 2), GPU_WHEEL_WORK (scratch directory, removed at the start).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_PIN="${GPU_WHEEL_TORCH:-2.14.1}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0}"
JOBS="${MAX_JOBS:-2}"
WORK="${GPU_WHEEL_WORK:-$ROOT/build/gpu-wheel}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

t0=$(date +%s)
phase() { printf -- '--- %s (%s, +%ds)\n' "$1" "$(date +%T)" "$(( $(date +%s) - t0 ))"; }

rm -rf "$WORK"
mkdir -p "$WORK"
# Disk: each CUDA torch venv is ~5.5 GB. Building and testing in two venvs at once (the first
# version of this script) needed 11+ GB free at the peak; stop 30's CI failed mid-compile with
# no error in its log tail. Now one venv at a time: the build venv is removed before the fresh one
# is filled (~1 min more, serial), and a failed build prints its compiler errors, disk and memory.
# (nvcc's temporaries go to $TMPDIR, /tmp by default: its file system is shown too.)
resources() {
  df -h "$WORK" "${TMPDIR:-/tmp}" | awk 'NR > 1 {print "disk: " $4 " free of " $2 " on " $6}' | uniq
  free -g | awk '/^Mem:/ {print "memory: " $7 " GiB available of " $2}'
}
resources

phase "build venv: CUDA torch $TORCH_PIN"
python3 -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/python" -m pip install -q "torch==$TORCH_PIN" ninja numpy setuptools wheel build
"$WORK/build-venv/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

# Build from a copy of the tree: setup.py writes fastner/_build_info.py, and the CUDA one must
# not replace the CPU build's in the tree the other CI steps test.
phase "GPU wheel build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$ARCHS, MAX_JOBS=$JOBS)"
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar cf - --null -T - --ignore-failed-read) | tar xf - -C "$WORK/src"
rm -f "$WORK/src/fastner/_build_info.py" "$WORK/src"/fastner/_C*.so
# /usr/bin/time -v: the build's peak memory (the largest nvcc), to size MAX_JOBS.
(cd "$WORK" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="$JOBS" \
  /usr/bin/time -v -o "$WORK/build-time.txt" \
  "$WORK/build-venv/bin/python" -m build --wheel --no-isolation --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1) \
  || { echo "--- the build's errors (first 40 lines naming one):"
         grep -E -i -m 40 'error|FAILED:|Killed|No space|fatal|terminated' "$WORK/build.log" | grep -v '^WARNING: Location' || true
         echo "--- its last 25 lines:"; tail -n 25 "$WORK/build.log"
         resources; cat "$WORK/build-time.txt" 2>/dev/null | grep -E 'Maximum resident|Exit status|Elapsed' || true
         echo "CI: the GPU wheel did not build (log: $WORK/build.log)" >&2; exit 1; }
grep '^fastner: CUDA build' "$WORK/build.log" | head -n 1
grep -E 'Maximum resident|Elapsed' "$WORK/build-time.txt"

phase "wheel name, contents and links"
"$WORK/build-venv/bin/python" - "$WORK/dist" <<'EOF'
import pathlib, subprocess, sys, tempfile, zipfile
import torch

(wheel,) = pathlib.Path(sys.argv[1]).glob("fastner-*.whl")
major, minor = torch.__version__.split(".")[:2]
local = f"+pt{major}{minor}cu{torch.version.cuda.replace('.', '')}"
assert local in wheel.name and wheel.name.endswith("-cp39-abi3-linux_x86_64.whl"), (local, wheel.name)
with zipfile.ZipFile(wheel) as zf:
    info = zf.read("fastner/_build_info.py").decode()
    assert f"CUDA_VERSION = {torch.version.cuda!r}" in info, info
    (so,) = [n for n in zf.namelist() if n.startswith("fastner/_C") and n.endswith(".so")]
    tmp = pathlib.Path(tempfile.mkdtemp()) / "_C.so"
    tmp.write_bytes(zf.read(so))
dynamic = subprocess.run(["readelf", "-d", str(tmp)], capture_output=True, text=True, check=True).stdout
needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
cuda_major = torch.version.cuda.split(".")[0]
# Linked by versioned name (cuda_build.py), no rpath: the libraries come from the user's torch.
for lib in (f"libcudart.so.{cuda_major}", f"libcublas.so.{cuda_major}", "libc10_cuda.so", "libtorch_cuda.so"):
    assert lib in needed, (lib, needed)
assert "RPATH" not in dynamic and "RUNPATH" not in dynamic, dynamic
print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB; NEEDED {' '.join(needed)}; no RPATH/RUNPATH")
EOF

phase "fresh venv: CUDA torch $TORCH_PIN and the wheel (the build venv removed first: disk)"
rm -rf "$WORK/build-venv"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q "torch==$TORCH_PIN" numpy pytest pytorch-crf==0.7.2 >"$WORK/venv-install.log" 2>&1 \
  || { grep -v '^WARNING: Location' "$WORK/venv-install.log" | tail -n 30; resources; echo "CI: the fresh venv's install failed" >&2; exit 1; }
# pip checks the wheel's own requirements (torch, numpy) against its metadata.
"$PY" -m pip install -q "$WORK"/dist/fastner-*.whl "torch==$TORCH_PIN"
"$PY" -m pip check
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

phase "import from outside the source tree, LD_BIND_NOW=1"
mkdir "$WORK/elsewhere"
(cd "$WORK/elsewhere" && env -i PATH="$PATH" HOME="$HOME" LD_BIND_NOW=1 SITE="$SITE" "$PY" - <<'EOF'
import json, os, torch, fastner
from fastner import reference

assert fastner.__file__.startswith(os.environ["SITE"]), fastner.__file__  # the installed copy
info = fastner.backend()
print(json.dumps(info))
assert info["cpu"] == "fused" and info["cuda"] == "unavailable" and info["cuda_kernels"] == "built", info
assert not torch.cuda.is_available()
B, T, K = 3, 7, 5
em = torch.randn(B, T, K, dtype=torch.float64)
lengths = torch.tensor([7, 3, 1])
trans, start, end = (torch.randn(K, K, dtype=torch.float64), torch.randn(K, dtype=torch.float64),
                     torch.randn(K, dtype=torch.float64))
log_z, _ = torch.ops.fastner.crf_forward(em, None, lengths, trans, start, end)
assert torch.allclose(log_z, reference.crf_log_partition(em, lengths, trans, start, end))
EOF
)

# The tests and the pytest configuration, copied away from the package: pytest's rootdir and
# sys.path then hold no fastner/, and conftest.py refuses to run if fastner is imported from
# anywhere but the venv ($FASTNER_TEST_INSTALLED_IN).
# The op-level suites (the ops' parity with the reference, opcheck, gradcheck, the CRF module,
# the backend report; the CUDA suites skip without a GPU but must import): about 290 tests. The
# module-level RNN suites (test_rnn_modules.py, test_rnn_parity.py) run only in the source-tree
# step, for CI's time.
phase "CPU op tests against the installed wheel"
mkdir "$WORK/suite"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/suite/"
(cd "$WORK/suite" && env LD_BIND_NOW=1 FASTNER_TEST_INSTALLED_IN="$SITE" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_backend.py tests/ops/crf/test_crf_module.py tests/ops/crf/test_crf_ops.py tests/ops/crf/test_crf_constraints.py \
  tests/ops/crf/test_crf_stability.py tests/ops/crf/test_crf_lanes.py tests/ops/rnn/test_rnn_ops.py \
  tests/ops/crf/test_crf_cuda.py tests/ops/rnn/test_rnn_cuda.py)

phase "done"
