"""cuda_build.py (setup.py's CUDA discovery): what it finds, and the message when a piece is missing.

Fake toolkits and fake nvidia-* trees in tmp_path; no compiler runs. The real build against the
pip CUDA torch is .ci/gpu_wheel.sh's.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import cuda_build

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fake_nvcc(bin_dir: pathlib.Path, release: str) -> pathlib.Path:
    # Answers --version like nvcc, and --dryrun with the TOP line of the real one.
    bin_dir.mkdir(parents=True, exist_ok=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$1" in --dryrun) echo "#\\$ TOP=' + str(bin_dir) + '/.." >&2 ;; '
        f'*) echo "Cuda compilation tools, release {release}, V{release}.1" ;; esac\n'
    )
    nvcc.chmod(0o755)
    return nvcc


def touch(directory: pathlib.Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("")


def test_nvcc_version_and_toolkit_root_are_read_from_nvcc(tmp_path):
    nvcc = fake_nvcc(tmp_path / "cuda-13.0" / "bin", "13.0")
    assert cuda_build.find_nvcc(str(tmp_path / "cuda-13.0")) == str(nvcc)
    version, root = cuda_build.nvcc_info(str(nvcc))
    assert version == "13.0" and root == str(tmp_path / "cuda-13.0")


def test_missing_nvcc_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(cuda_build.CudaBuildError, match=r"needs nvcc, which was not found.*FORCE_ONLY_CPU=1"):
        cuda_build.find_nvcc(str(tmp_path / "nowhere"))


def test_cpu_torch_and_major_version_mismatch_are_named():
    with pytest.raises(cuda_build.CudaBuildError, match=r"torch 2\.14\.1\+cpu is a CPU-only build"):
        cuda_build.check_versions("2.14.1+cpu", None, "/x/nvcc", "13.0")
    with pytest.raises(cuda_build.CudaBuildError, match=r"/x/nvcc is CUDA 12\.4 but torch 2\.14\.1 was built with CUDA 13\.0"):
        cuda_build.check_versions("2.14.1", "13.0", "/x/nvcc", "12.4")
    cuda_build.check_versions("2.14.1", "13.0", "/x/nvcc", "13.2")  # minor versions may differ


def test_headers_the_toolkit_lacks_come_from_the_pip_directory(tmp_path):
    toolkit, pip_dir = tmp_path / "toolkit", tmp_path / "nvidia" / "cu13" / "include"
    touch(toolkit, "cuda_runtime_api.h")
    touch(pip_dir, *cuda_build.REQUIRED_HEADERS)
    assert cuda_build.locate_headers([str(toolkit)], [str(pip_dir)]) == [str(pip_dir)]
    touch(toolkit, *cuda_build.REQUIRED_HEADERS)  # a full toolkit needs nothing else
    assert cuda_build.locate_headers([str(toolkit)], [str(pip_dir)]) == []


def test_missing_headers_are_named_with_their_package(tmp_path):
    touch(tmp_path / "inc", "cuda_runtime_api.h", "cusparse.h", "cusolverDn.h")
    with pytest.raises(cuda_build.CudaBuildError, match=r"cublas_v2\.h \(nvidia-cublas\), cublasLt\.h \(nvidia-cublas\)"):
        cuda_build.locate_headers([str(tmp_path / "inc")], [])


def test_libraries_are_linked_by_versioned_name(tmp_path):
    pip_lib, toolkit_lib = tmp_path / "pip", tmp_path / "toolkit"
    touch(pip_lib, "libcudart.so.13", "libcublas.so.13")
    touch(toolkit_lib, "libcudart.so", "libcudart.so.13", "libcublas.so.13")
    dirs, args = cuda_build.locate_libraries("13", [str(pip_lib), str(toolkit_lib)])
    assert dirs == [str(pip_lib)]  # torch's copies first
    assert args == ["-l:libcudart.so.13", "-l:libcublas.so.13"]


def test_missing_libraries_are_named(tmp_path):
    touch(tmp_path, "libcudart.so", "libcublas.so.12")  # unversioned, or another major: neither will do
    with pytest.raises(cuda_build.CudaBuildError, match=r"libcudart\.so\.13 \(nvidia-cuda-runtime\), libcublas\.so\.13 \(nvidia-cublas\)"):
        cuda_build.locate_libraries("13", [str(tmp_path)])


def test_compile_args_put_the_pip_headers_after_the_toolkit_for_both_compilers():
    build = cuda_build.CudaBuild("nvcc", "13.0", None, include_dirs=["/p/include"])
    assert build.compile_args("cxx") == ["-idirafter", "/p/include"]
    assert build.compile_args("nvcc") == ["-Xcompiler", "-idirafter,/p/include"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_setup_py_refuses_a_cuda_build_against_a_cpu_torch_with_a_clear_message():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, FORCE_CUDA="1"))
    assert out.returncode != 0
    assert "is a CPU-only build" in out.stderr and "FORCE_ONLY_CPU=1" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
