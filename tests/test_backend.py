import subprocess
import sys

import torch

import fastner


def test_backend_reports_every_device():
    info = fastner.backend()
    assert set(info) >= {"cpu", "cuda", "version", "torch"}
    assert info["cpu"] in ("fused", "reference")
    assert info["cuda"] in ("fused", "reference", "unavailable")
    if not torch.cuda.is_available():
        assert info["cuda"] == "unavailable"
    assert info["version"] == fastner.__version__


def test_extension_is_built_and_serves_cpu():
    # CI builds the extension; a silent fall back to the reference path there would hide a
    # broken build behind passing tests.
    info = fastner.backend()
    assert info["cpu"] == "fused", info


def _backend_in_subprocess(env_value):
    code = "import fastner, json; print(json.dumps(fastner.backend()))"
    env = dict(__import__("os").environ, FASTNER_BACKEND=env_value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return __import__("json").loads(out.stdout)


def test_env_var_forces_reference():
    info = _backend_in_subprocess("reference")
    assert info["cpu"] == "reference"


def test_env_var_rejects_unknown_value():
    code = "import fastner; fastner.backend()"
    env = dict(__import__("os").environ, FASTNER_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTNER_BACKEND" in out.stderr


def test_broken_extension_falls_back_and_warns_once():
    # sys.modules[...] = None makes `from fastner import _C` raise ImportError, as a broken
    # build would.
    code = (
        "import sys, warnings, json\n"
        "sys.modules['fastner._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastner\n"
        "    info = fastner.backend(); fastner.backend()\n"
        "msgs = [str(w.message) for w in caught if 'fastner' in str(w.message)]\n"
        "print(json.dumps({'info': info, 'msgs': msgs}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = __import__("json").loads(out.stdout)
    assert result["info"]["cpu"] == "reference"
    assert "fastner._C" in result["info"]["extension_error"]
    assert len(result["msgs"]) == 1 and "reference path" in result["msgs"][0]
