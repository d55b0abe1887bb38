"""The CPU wheel builds, installs into a fresh venv and runs fused from outside the source tree.

Slow (a full extension build plus a torch install into a new venv): `python -m pytest -m slow
tests/test_wheel.py`. .ci/run runs it as its own step.
"""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = r"""
import json, torch, fastner
from fastner import reference
assert fastner.__file__.startswith(SITE), fastner.__file__  # the installed copy, not the tree
info = fastner.backend()
assert info["cpu"] == "fused", info
torch.manual_seed(0)
B, T, K = 3, 7, 5
em = torch.randn(B, T, K, dtype=torch.float64)
lengths = torch.tensor([7, 3, 1])
trans, start, end = torch.randn(K, K, dtype=torch.float64), torch.randn(K, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
log_z, _ = torch.ops.fastner.crf_forward(em, None, lengths, trans, start, end)
expected = reference.crf_log_partition(em, lengths, trans, start, end)
assert torch.allclose(log_z, expected), (log_z, expected)
print(json.dumps(info))
"""


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.mark.slow
def test_cpu_wheel_installs_and_runs_fused(tmp_path):
    dist = tmp_path / "dist"
    env = dict(os.environ, FORCE_ONLY_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    # `build` is a test dependency (.[test]); run from tmp_path so the tree's build/ folder
    # cannot pass for the `build` package.
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
         env=env, cwd=tmp_path)
    (wheel,) = dist.glob("fastner-*.whl")
    major, minor = torch.__version__.split(".")[:2]
    assert f"+pt{major}{minor}cpu" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("fastner/_C") and n.endswith(".so") for n in names), names
    assert "fastner/_build_info.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "numpy"])
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Run from an empty directory so the source tree cannot shadow the installed package.
    out = _run([py, "-c", f"SITE = {site!r}\n" + SMOKE], cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert '"cpu": "fused"' in out.stdout
