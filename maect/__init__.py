"""maect: MAE-CT (Masked Autoencoder Contrastive Tuning, Lehner et al. 2023)."""
__version__ = "0.1.0"
