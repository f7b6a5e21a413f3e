"""Run by tests/test_shards.py under torchrun (2 ranks, gloo): maect.train.main ARGS on WebDataset shards, recording
the sample ids of every training batch this rank's ShardLoader yields; writes OUT/ids-rank<R>.json as a list of
[loader number, epoch, ids]."""
import json
import os
import sys

from maect import train
from maect.dataloading import shard_loader

out, args = sys.argv[1], sys.argv[2:]
seen = []
real = shard_loader.ShardLoader._collate


def spy(self, batch, step):
    b = real(self, batch, step)
    if not hasattr(self, "spy_number"):         # not id(self): a freed loader's address can be reused
        self.spy_number = len({k for k, _, _ in seen})
    seen.append([self.spy_number, self.epoch, b["idx"].tolist()])
    return b


shard_loader.ShardLoader._collate = spy
train.main(args)
with open(os.path.join(out, f"ids-rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
