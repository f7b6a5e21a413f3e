"""maect: MAE-CT (Masked Autoencoder Contrastive Tuning, Lehner et al. 2023).

Subpackages: maect.kernels (fused ops for SSL code: `from maect.kernels import queue_topk`), maect.dataloading,
maect.models, maect.eval. In the repository kernels/ and dataloading/ sit beside maect/; setup.py's package_dir maps
them to maect.kernels / maect.dataloading, so they import under those names from an installed wheel (which holds them
inside maect/) or from an editable install of a checkout (`pip install -e .`, as ./setup.sh does: setuptools' editable
finder resolves them to the checkout's folders). A checkout that is not installed imports `maect` alone.
"""
__version__ = "0.1.0"
