"""Data loading for maect: sources (Fashion-MNIST arrays, image folders, flat folders, file lists), the one decode
rule for image files, batched augmentations, loaders (torch twin and DALI)."""
from maect.dataloading.datasets import (ArrayData, ImageFiles, ImageFolder, NoLabels, fashion_mnist,  # noqa: F401
                                        load_data, load_eval_data)
from maect.dataloading.images import BadImage, DataError, decode_image  # noqa: F401
from maect.dataloading.loader import TrainLoader, build_loader, eval_batches  # noqa: F401
