import os
import subprocess
import sys

import torch

import fastner
from tests import testing


def test_backend_reports_every_device():
    info = fastner.backend()
    assert set(info) >= {"cpu", "cuda", "version", "torch"}
    assert info["cpu"] in ("fused", "reference")
    assert info["cuda"] in ("fused", "reference", "unavailable")
    assert info["cuda_kernels"] in ("built", "not built", "not loaded")
    if not torch.cuda.is_available():
        assert info["cuda"] == "unavailable"
    assert info["version"] == fastner.__version__


def test_cuda_kernels_are_reported_as_built_exactly_when_the_build_had_cuda():
    info = fastner.backend()
    assert info["cuda_kernels"] != "not loaded", info  # CI builds the extension
    try:
        from fastner import _build_info
    except ImportError:  # an extension copied in without its build info: the dispatcher alone
        built_with_cuda = info["cuda_kernels"] == "built"
    else:
        built_with_cuda = _build_info.CUDA_VERSION is not None
    assert info["cuda_kernels"] == ("built" if built_with_cuda else "not built"), info
    if torch.version.cuda is None:  # a CPU torch cannot carry CUDA kernels
        assert info["cuda_kernels"] == "not built", info


def test_a_visible_gpu_is_served_fused_exactly_when_the_cuda_kernels_are_built(monkeypatch):
    # Tells "built, no device" from "not built" and "fused" on a machine without a GPU: with a
    # GPU made visible, a build with CUDA kernels serves it fused, one without serves the reference.
    kernels = fastner.backend()["cuda_kernels"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = fastner.backend()
    assert info["cuda_kernels"] == kernels
    assert info["cuda"] == ("fused" if kernels == "built" else "reference"), info


def test_extension_is_built_and_serves_cpu():
    # CI builds the extension; a silent fall back to the reference path there would hide a
    # broken build behind passing tests.
    info = fastner.backend()
    assert info["cpu"] == "fused", info


def test_backend_names_the_cpu_kernels_this_cpu_can_run():
    # cpu_simd for every family; cpu_int8 / cpu_bf16 for the int8 and bf16 layers' products:
    # the AVX-512 kernels exactly where the CPU has what they need (x86-64 Linux: the flags of
    # /proc/cpuinfo), AMX for the bf16 products where it has AMX-BF16, and all AVX2 under
    # FASTNER_CPU_ISA=avx2.
    info = fastner.backend()
    flags = testing.cpu_flags()
    if not flags:
        return  # not Linux x86-64: the values are checked by the kernels' own tests
    # FASTNER_CPU_ISA=avx2 (or FASTNER_RNN_INT8=avx2) in the test run's environment forces AVX2.
    avx512 = testing.AVX512 <= flags and os.environ.get("FASTNER_CPU_ISA") != "avx2"
    assert info["cpu_simd"] == ("avx512" if avx512 else "avx2"), info
    assert info["cpu_int8"] == testing.expected_int8_kernel(), info
    assert info["cpu_bf16"] == testing.expected_bf16_kernel(), info
    code = "import fastner, json; print(json.dumps(fastner.backend()))"
    env = dict(os.environ, FASTNER_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    forced = __import__("json").loads(out.stdout)
    assert (forced["cpu_simd"], forced["cpu_int8"], forced["cpu_bf16"]) == ("avx2", "avx2", "avx2"), forced
    # FASTNER_CPU_ISA=avx512 keeps the AVX-512 kernels and leaves AMX out.
    env = dict(os.environ, FASTNER_CPU_ISA="avx512")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    capped = __import__("json").loads(out.stdout)
    assert capped["cpu_simd"] == info["cpu_simd"], (capped, info)
    assert capped["cpu_int8"] == testing.expected_int8_kernel("avx512"), capped
    assert capped["cpu_bf16"] == testing.expected_bf16_kernel("avx512"), capped


def test_cpu_isa_switch_rejects_unknown_values():
    # It was: any value but "avx2" (e.g. "AVX2") silently left the AVX-512 kernels on.
    code = ("import fastner, torch\n"
            "from fastner.nn import LSTM\n"
            "for call in (fastner.backend, lambda: LSTM(4, 4, batch_first=True)(torch.randn(1, 2, 4), "
            "lengths=torch.tensor([2]))):\n"
            "    try:\n"
            "        call()\n"
            "    except ValueError as e:\n"
            "        print('ValueError:', e)\n")
    env = dict(os.environ, FASTNER_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    message = ("ValueError: FASTNER_CPU_ISA must be 'avx2' or 'avx512' (or unset: the best the CPU has, AMX tiles "
               "included), got 'AVX2'")
    assert out.stdout.count(message) == 2, out.stdout


def _backend_in_subprocess(env_value):
    code = "import fastner, json; print(json.dumps(fastner.backend()))"
    env = dict(__import__("os").environ, FASTNER_BACKEND=env_value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return __import__("json").loads(out.stdout)


def test_env_var_forces_reference():
    info = _backend_in_subprocess("reference")
    assert info["cpu"] == "reference"
    assert info["cuda"] in ("reference", "unavailable")
    assert info["cuda_kernels"] == "not loaded"  # the extension is not even imported


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
    assert result["info"]["cuda_kernels"] == "not loaded"
    assert "fastner._C" in result["info"]["extension_error"]
    assert len(result["msgs"]) == 1 and "reference path" in result["msgs"][0]


_FAKE_BUILD_FOR_OTHER_TORCH = (
    "import sys, types\n"
    "info = types.ModuleType('fastner._build_info')\n"
    "info.TORCH_VERSION, info.CUDA_VERSION = '1.0.0', None\n"
    "sys.modules['fastner._build_info'] = info\n"
    "import fastner\n"
    "print(fastner.backend()['cpu'])\n"
)


def test_extension_built_for_another_torch_is_a_clear_error():
    out = subprocess.run([sys.executable, "-c", _FAKE_BUILD_FOR_OTHER_TORCH], capture_output=True, text=True)
    assert out.returncode != 0
    assert "TorchMismatchError" in out.stderr and "built for torch 1.0.0" in out.stderr


def test_reference_backend_still_imports_with_a_mismatched_build():
    env = dict(__import__("os").environ, FASTNER_BACKEND="reference")
    out = subprocess.run(
        [sys.executable, "-c", _FAKE_BUILD_FOR_OTHER_TORCH], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "reference"


def test_use_fused_is_marked_constant_as_torch_compiler_marks_it():
    # fastner._extension marks use_fused the way torch.compiler.assume_constant_result does,
    # without importing torch._dynamo: the two must stay the same (a torch that marks functions
    # otherwise fails here, not silently in compiled graphs).
    from fastner._extension import _constant_under_compile, use_fused

    def ours():
        return True

    def torchs():
        return True

    assert _constant_under_compile(ours) is ours and torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
    assert vars(use_fused) == vars(ours)


def test_import_and_load_do_not_import_torch_compile(tmp_path):
    # torch._dynamo costs 1.3-1.6 s to import on the project's machine: it was imported by
    # `import fastner` (torch.compiler.assume_constant_result) and by Tagger.load (nn.init.normal_
    # on the meta skeleton), every `fastner tag` call and server start paying it.
    from pathlib import Path

    model = Path(__file__).parent / "fixtures" / "tagger_format1"
    code = ("import sys\nimport fastner, fastner.cli, fastner.nn\nfrom fastner.tagger import Tagger\n"
            f"Tagger.load({str(model)!r})\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
