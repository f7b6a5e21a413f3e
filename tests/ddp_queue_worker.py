"""Run by tests/test_nnclr.py under torchrun (2 ranks, gloo): enqueue rank-specific rows and save each rank's queue
and the loss gradient w.r.t. its predictions."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from maect import dist as mdist
from maect.heads import FeatureQueue
from maect.losses import nnclr_loss

mdist.init("cpu")
r = dist.get_rank()
torch.manual_seed(0)  # the same "global batch" on every rank; each keeps its slice
G = {"p0": torch.randn(16, 8), "p1": torch.randn(16, 8), "nn0": F.normalize(torch.randn(16, 8), dim=1),
     "nn1": F.normalize(torch.randn(16, 8), dim=1)}
sl = slice(8 * r, 8 * (r + 1))
p0, p1 = G["p0"][sl].clone().requires_grad_(), G["p1"][sl].clone().requires_grad_()
loss = nnclr_loss(G["nn0"][sl], G["nn1"][sl], p0, p1, 0.15)
loss.backward()
q = FeatureQueue(64, 8, generator=torch.Generator().manual_seed(1))
ids = torch.arange(8) + 8 * r
q.enqueue(mdist.all_gather(F.normalize(G["p0"][sl], dim=1)), mdist.all_gather(ids), mdist.all_gather(ids % 3))
torch.save({"queue": q.state_dict(), "grad_p0": p0.grad, "loss": loss.item(), "global": G}, f"{sys.argv[1]}/rank{r}.pt")
dist.destroy_process_group()
