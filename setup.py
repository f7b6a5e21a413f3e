"""maect: MAE-CT (Masked Autoencoder Contrastive Tuning), fast and faithful.

Installs one top-level package, `maect`. The repository keeps the design's layout (kernels/, dataloading/, csrc/ beside
maect/); the wheel installs them as `maect.kernels`, `maect.dataloading` and `maect/_csrc` (the C++ sources, package
data for the just-in-time build), so nothing clashes with other distributions' top-level names (`kernels` is one on
the index). The C++ extension in csrc/ is not built here (pip's isolated build environment would pull a second
torch): kernels/_cpp.py builds it just in time on first use against the installed torch (torch.utils.cpp_extension,
cached under ~/.cache/torch_extensions or TORCH_EXTENSIONS_DIR); its docstring says how to build it ahead of time.
"""
from setuptools import find_packages, setup

setup(
    name="maect",
    version="0.1.0",
    description="MAE-CT: contrastive tuning of masked autoencoders (fast kernels, faithful recipe)",
    python_requires=">=3.10",
    packages=find_packages(include=["maect", "maect.*"]) + ["maect.kernels", "maect.kernels.ops", "maect.dataloading",
                                                             "maect._csrc"],
    package_dir={"maect.kernels": "kernels", "maect.dataloading": "dataloading", "maect._csrc": "csrc"},
    package_data={"maect": ["presets/*.yaml"], "maect._csrc": ["*.cpp", "*.h"]},
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
)
