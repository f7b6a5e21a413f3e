"""maect: MAE-CT (Masked Autoencoder Contrastive Tuning, Lehner et al. 2023).

Subpackages: maect.kernels (fused ops for SSL code: `from maect.kernels import queue_topk`), maect.dataloading,
maect.models, maect.eval. In a source checkout kernels/ and dataloading/ sit beside maect/ (the repository's layout);
an installed wheel holds them inside maect/. Either way they import only as maect.kernels / maect.dataloading.
"""
import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    # Source checkout (also an editable install): let maect.kernels / maect.dataloading resolve to the folders beside
    # this one, in the same tree (a git worktree must not pick up another tree's kernels).
    __path__.append(_root)  # noqa: F821  (a package's __path__)
