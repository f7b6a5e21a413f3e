"""Host-to-device copies shared by the model layer (the NNCLR queue's neighbour draw) and the data layer (loaders,
augmentation parameters), so neither imports the other."""
from __future__ import annotations

import torch
from torch import Tensor


def h2d(t: Tensor, device) -> Tensor:
    """A CPU tensor onto `device` without a host sync: pinned, then an asynchronous copy (a pageable copy to a
    GPU waits for the stream). On the CPU, the tensor itself."""
    device = torch.device(device)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
