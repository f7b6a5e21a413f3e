"""maect: MAE-CT (Masked Autoencoder Contrastive Tuning), fast and faithful.

Installs one top-level package, `maect`. The repository keeps the design's layout (kernels/, dataloading/, csrc/ beside
maect/); the wheel installs them as `maect.kernels`, `maect.dataloading` and `maect/_csrc` (the C++ sources, package
data for the just-in-time build), so nothing clashes with other distributions' top-level names (`kernels` is one on
the index). The C++ extension in csrc/ is NOT built here by
default: pip's isolated build environment would pull a second torch. It is built just in time on first use
(torch.utils.cpp_extension, cached) by kernels/_cpp.py. To build it ahead of time against the installed torch:
    MAECT_BUILD_EXT=1 pip install --no-build-isolation -e .
(MAECT_BUILD_CUDA=1 additionally compiles csrc/*.cu sources, when present, as a CUDAExtension.)
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("MAECT_BUILD_EXT") == "1":
    try:  # only with --no-build-isolation, against the torch already installed
        from torch.utils import cpp_extension

        sources = sorted(glob.glob("csrc/*.cpp"))
        cuda = os.environ.get("MAECT_BUILD_CUDA") == "1"
        if cuda:
            sources += sorted(glob.glob("csrc/*.cu"))
        Ext = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
        # Same flags as the JIT build in kernels/_cpp.py: AVX2/FMA only if this CPU has them (never -march=native);
        # the C++ standard is left to torch (its headers need C++20).
        import torch

        simd = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
        ext_modules = [Ext("maect.kernels._maect_C", sources, extra_compile_args={"cxx": ["-O3", "-fopenmp"] + simd},
                           extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": cpp_extension.BuildExtension}
    except Exception as exc:  # the package must still install; dispatch falls back and logs why
        print(f"maect: not building the C++ extension ({exc}); the JIT build or the reference will be used")

setup(
    name="maect",
    version="0.1.0",
    description="MAE-CT: contrastive tuning of masked autoencoders (fast kernels, faithful recipe)",
    python_requires=">=3.10",
    packages=find_packages(include=["maect", "maect.*"]) + ["maect.kernels", "maect.kernels.ops", "maect.dataloading",
                                                             "maect._csrc"],
    package_dir={"maect.kernels": "kernels", "maect.dataloading": "dataloading", "maect._csrc": "csrc"},
    package_data={"maect": ["presets/*.yaml", "models/*.json"], "maect.kernels": ["*.json"],
                  "maect.kernels.ops": ["*.json"], "maect._csrc": ["*.cpp", "*.h", "*.cu"]},
    include_package_data=True,
    install_requires=["torch>=2.10", "numpy", "pyyaml", "pillow", "safetensors", "triton; platform_system=='Linux'"],
    extras_require={
        # lightly: tests/test_integrations.py checks maect.integrations.lightly against lightly's own module (its
        # Requires-Dist leave an installed torch alone; it adds pytorch_lightning, hydra-core, torchmetrics)
        # selenium: tests/test_viz_report.py opens the report in headless Chromium (setup.sh installs chromium and
        # chromium-driver from Debian)
        "test": ["pytest", "scipy", "scikit-learn", "torchvision", "timm", "matplotlib", "submitit", "lightly==1.6.0",
                 "webdataset>=1.0", "tensorboard>=2.14", "wandb>=0.17", "selenium>=4.11"],
        "slurm": ["submitit"],          # python -m maect.launch (multi-node jobs that requeue and resume)
        "wds": ["webdataset>=1.0"],     # data.name=wds (its deps: braceexpand, numpy, pyyaml)
        "tensorboard": ["tensorboard>=2.14"],   # log.tensorboard=true
        "wandb": ["wandb>=0.17"],               # log.wandb=PROJECT
        # xformers 0.0.35 (Requires-Dist torch>=2.10: an installed torch is kept) is a CUDA 12.8 build; beside a
        # CUDA 13 torch its extension needs libcudart.so.12, which nvidia-cuda-runtime-cu12 installs and
        # maect.models.xformers_load preloads (docs/kernels.md, "Attention").
        "gpu": ["xformers==0.0.35; platform_system=='Linux'",
                "nvidia-cuda-runtime-cu12>=12.8,<13; platform_system=='Linux'", "nvidia-dali-cuda130"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
