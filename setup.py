"""Builds fastdiff._C: C++ with OpenMP everywhere, CUDA sources where CUDA is present.

Environment switches:
  FASTDIFF_CUDA=1 / 0     force the CUDA sources in or out (default: in when torch
                          was built with CUDA and a CUDA toolkit is found)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0": A100 and H100/H200)
  FASTDIFF_NO_EXTENSION=1 install the pure-Python package only (reference twins)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() not in ("0", "false", "no", "")


def _extensions():
    if _flag("FASTDIFF_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    want_cuda = _flag("FASTDIFF_CUDA")
    cuda_found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    with_cuda = cuda_found if want_cuda is None else want_cuda
    if with_cuda and not cuda_found:
        sys.exit(
            "FASTDIFF_CUDA=1 but this torch has no CUDA (torch.version.cuda is None) or no "
            "CUDA toolkit was found (set CUDA_HOME)."
        )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = ["csrc/fastdiff.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # The C++ standard is left to torch.utils.cpp_extension, which matches torch's headers.
    cxx = ["-O3", *openmp]
    define = [("Py_LIMITED_API", "0x03090000")]
    kwargs = dict(
        name="fastdiff._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=openmp,
        define_macros=define,
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        kwargs["define_macros"] = define + [("FASTDIFF_WITH_CUDA", None)]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3"]}
        ext = cpp_extension.CUDAExtension(sources=sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = cpp_extension.CppExtension(sources=sources, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fastdiff", "fastdiff.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
