"""`python tests/pick_recorder.py OUT ARGS...` (or under torchrun): `python -m maect.train ARGS`, with every
neighbour pick recorded. Each FeatureQueue.lookup call saves OUT/rank<r>_call<n>.pt: the query rows z [N, d] and
their sample ids, the queue (features, ids) as the lookup saw it, the top-k candidates (indices, in the order the
backend returned them) and the picked index. tests/test_nnclr.py compares two runs' picks by these records."""
import os
import runpy
import sys

import torch

from maect import kernels
from maect.heads import FeatureQueue

out = sys.argv.pop(1)
os.makedirs(out, exist_ok=True)
real_lookup = FeatureQueue.lookup
calls = [0]


def lookup(self, z, ids, k, generator=None):
    nn, idx = real_lookup(self, z, ids, k, generator=generator)
    _, cand = kernels.queue_topk(z.to(self.features.dtype), self.features, k, exclude_ids=ids, queue_ids=self.ids)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"z": z.detach().cpu().clone(), "ids": ids.cpu().clone(), "features": self.features.cpu().clone(),
                "queue_ids": self.ids.cpu().clone(), "cand": cand.cpu(), "idx": idx.cpu().clone(), "k": k},
               os.path.join(out, f"rank{rank}_call{calls[0]}.pt"))
    calls[0] += 1
    return nn, idx


FeatureQueue.lookup = lookup
sys.argv[0] = "maect.train"
runpy.run_module("maect.train", run_name="__main__", alter_sys=True)
