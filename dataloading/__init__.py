"""Data loading for maect: datasets (Fashion-MNIST arrays, image folders), batched augmentations, loaders."""
from maect.dataloading.datasets import ArrayData, ImageFolder, fashion_mnist, load_data  # noqa: F401
from maect.dataloading.loader import TrainLoader, build_loader, eval_batches  # noqa: F401
