"""Where the CUDA extension's compiler, headers and libraries are (used by setup.py).

fastner's CUDA sources need nvcc, the CUDA runtime and cuBLAS (csrc/cuda/rnn.cu calls
cublasGemmEx), and torch's ATen/cuda/CUDAContext.h also includes the cuSPARSE, cuBLASLt and
cuSOLVER headers. A CUDA torch from pip brings all of these headers and libraries as nvidia-*
packages (site-packages/nvidia/cu13/{include,lib} for CUDA 13, nvidia/<lib>/{include,lib} for
CUDA 12), so a bare nvcc is all the toolkit a build needs. Two things differ from a full toolkit:

- The pip packages ship versioned libraries only (libcudart.so.13, no libcudart.so), so `-lcudart`
  cannot find them: they are linked by file name (`-l:libcudart.so.13`). The result records the
  same DT_NEEDED entry (the SONAME) either way.
- Their headers go on the search path *after* the toolkit's own (`-idirafter`): where nvcc comes
  with its own cuda_runtime.h, that one (which matches nvcc's crt/ headers) wins, and the pip
  directory only supplies what the toolkit lacks (cuBLAS, cuSPARSE, ...).

No rpath is set. fastner._C is loaded only by `import fastner`, which imports torch first, and
torch loads these same libraries (its libtorch_cuda.so needs libcudart.so.13 and libcublas.so.13,
found through its own rpath into site-packages/nvidia); the dynamic loader then satisfies
fastner._C's DT_NEEDED entries by SONAME from the libraries already loaded. This is also how
fastner._C finds libtorch/libc10, and it keeps a build machine's paths out of the wheel: the wheel
uses whichever copy the user's torch uses. (.ci/run checks the DT_NEEDED entries, the absence
of a RUNPATH, and an import with LD_BIND_NOW=1, which fails on any unresolved symbol.)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional

# Header -> the pip package (of a CUDA torch) that ships it.
REQUIRED_HEADERS = {
    "cuda_runtime_api.h": "nvidia-cuda-runtime",
    "cublas_v2.h": "nvidia-cublas",
    "cublasLt.h": "nvidia-cublas",
    "cusparse.h": "nvidia-cusparse",
    "cusolverDn.h": "nvidia-cusolver",
}
# Libraries fastner._C calls directly -> the pip package that ships them.
REQUIRED_LIBRARIES = {"cudart": "nvidia-cuda-runtime", "cublas": "nvidia-cublas"}

HINT = "(or set FORCE_ONLY_CPU=1 to build the CPU kernels only)"


class CudaBuildError(RuntimeError):
    """Something the CUDA build needs is missing; the message names it and what provides it."""


@dataclass
class CudaBuild:
    nvcc: str
    nvcc_version: str  # "13.0"
    toolkit_root: Optional[str]  # the directory nvcc reports as its TOP
    include_dirs: List[str] = field(default_factory=list)  # searched after the toolkit's own
    library_dirs: List[str] = field(default_factory=list)
    link_args: List[str] = field(default_factory=list)  # -l:libcudart.so.13 ...

    def compile_args(self, compiler: str) -> List[str]:
        """-idirafter flags for one compiler ('cxx' or 'nvcc', which hands them to the host compiler)."""
        args = []
        for path in self.include_dirs:
            args += ["-idirafter", path] if compiler == "cxx" else ["-Xcompiler", f"-idirafter,{path}"]
        return args


def find_nvcc(cuda_home: Optional[str]) -> str:
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append(shutil.which("nvcc") or "")
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise CudaBuildError(
        "FastNER's CUDA build needs nvcc, which was not found (looked in "
        f"{os.path.join(cuda_home, 'bin') if cuda_home else '$CUDA_HOME/bin (unset)'} and on PATH): install the "
        "CUDA compiler of the CUDA version torch was built with (e.g. the nvidia-cuda-nvcc package, or a "
        f"CUDA toolkit) and put it on PATH or set CUDA_HOME {HINT}"
    )


def nvcc_info(nvcc: str):
    """(version 'X.Y', toolkit root or None) as nvcc itself reports them."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        version = re.search(r"release (\d+\.\d+)", out).group(1)
    except (OSError, subprocess.CalledProcessError, AttributeError) as err:
        raise CudaBuildError(f"could not read the CUDA version of {nvcc} (`nvcc --version`): {err}") from err
    # nvcc may be a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc): its
    # own dry run names the real toolkit directory, where its headers and libraries live.
    dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.MULTILINE)
    root = os.path.normpath(match.group(1).strip()) if match else None
    return version, root


def check_versions(torch_version: str, torch_cuda: Optional[str], nvcc: str, nvcc_version: str) -> None:
    if torch_cuda is None:
        raise CudaBuildError(
            f"torch {torch_version} is a CPU-only build, so fastner's CUDA kernels cannot be built against it: "
            f"install a CUDA build of torch (e.g. torch==2.14.1, which is CUDA 13.0) {HINT}"
        )
    if nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        raise CudaBuildError(
            f"{nvcc} is CUDA {nvcc_version} but torch {torch_version} was built with CUDA {torch_cuda}: the major "
            f"versions must match; put nvcc {torch_cuda.split('.')[0]}.x on PATH (or set CUDA_HOME) {HINT}"
        )


def pip_cuda_dirs(major: str, kind: str) -> List[str]:
    """The nvidia-* packages' `include` or `lib` directories, CUDA 13 layout (nvidia/cu13/...) first."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    dirs = []
    for root in roots:
        dirs += glob.glob(os.path.join(root, f"cu{major}", kind))
        dirs += sorted(glob.glob(os.path.join(root, "*", kind)))  # CUDA 12: nvidia/cublas/lib, ...
    seen = set()
    return [d for d in dirs if os.path.isdir(d) and not (d in seen or seen.add(d))]


def toolkit_dirs(roots: List[Optional[str]], kind: str) -> List[str]:
    subdirs = ["include", os.path.join("targets", "x86_64-linux", "include")] if kind == "include" else [
        "lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")]
    dirs = []
    for root in roots:
        if root:
            dirs += [os.path.join(root, sub) for sub in subdirs if os.path.isdir(os.path.join(root, sub))]
    return dirs


def locate_headers(toolkit_includes: List[str], pip_includes: List[str]) -> List[str]:
    """The pip include directories needed for the headers the toolkit lacks."""
    extra, missing = [], []
    for header, package in REQUIRED_HEADERS.items():
        if any(os.path.isfile(os.path.join(d, header)) for d in toolkit_includes):
            continue
        found = next((d for d in pip_includes if os.path.isfile(os.path.join(d, header))), None)
        if found is None:
            missing.append(f"{header} ({package})")
        elif found not in extra:
            extra.append(found)
    if missing:
        raise CudaBuildError(
            f"CUDA headers not found: {', '.join(missing)}; looked in {toolkit_includes + pip_includes or 'nothing'}. "
            f"Install torch's CUDA wheel with its nvidia-* packages, or a CUDA toolkit with the math libraries {HINT}"
        )
    return extra


def locate_libraries(major: str, search: List[str]):
    """(library dirs, link args) linking each required library by its versioned file name."""
    dirs, args, missing = [], [], []
    for name, package in REQUIRED_LIBRARIES.items():
        filename = f"lib{name}.so.{major}"
        found = next((d for d in search if os.path.isfile(os.path.join(d, filename))), None)
        if found is None:
            missing.append(f"{filename} ({package})")
            continue
        if found not in dirs:
            dirs.append(found)
        args.append(f"-l:{filename}")
    if missing:
        raise CudaBuildError(
            f"CUDA libraries not found: {', '.join(missing)}; looked in {search or 'nothing'}. Install torch's CUDA "
            f"wheel with its nvidia-* packages, or a CUDA toolkit with these libraries {HINT}"
        )
    return dirs, args


def discover(torch_version: str, torch_cuda: Optional[str], cuda_home: Optional[str]) -> CudaBuild:
    """Everything the CUDA build needs, or a CudaBuildError naming what is missing."""
    nvcc = find_nvcc(cuda_home)
    version, root = nvcc_info(nvcc)
    check_versions(torch_version, torch_cuda, nvcc, version)
    major = torch_cuda.split(".")[0]
    roots = [root, cuda_home]
    extra_includes = locate_headers(toolkit_dirs(roots, "include"), pip_cuda_dirs(major, "include"))
    # The pip libraries first: they are the copies torch loads at run time.
    lib_dirs, link_args = locate_libraries(major, pip_cuda_dirs(major, "lib") + toolkit_dirs(roots, "lib"))
    return CudaBuild(nvcc, version, root, extra_includes, lib_dirs, link_args)


def summary(build: CudaBuild) -> str:
    return (f"fastner: CUDA build with {build.nvcc} (CUDA {build.nvcc_version}); extra headers from "
            f"{build.include_dirs or 'none'}; linking {' '.join(build.link_args)} from {build.library_dirs}")
