"""Run by tests/test_shards.py under torchrun (2 ranks, gloo): maect.train.main ARGS on WebDataset shards, recording
the sample ids of every training batch this rank's ShardLoader yields; writes OUT/ids-rank<R>.json as a list of
[loader number, epoch, ids]. collate_spy is also the in-process recorder of test_shards.py's trainer run."""
import json
import os
import sys

from maect.dataloading import shard_loader


def collate_spy(seen: list):
    """A ShardLoader._collate that appends [loader number, epoch, batch ids] to seen for every batch; loaders are
    numbered in the order they yield their first batch."""
    real = shard_loader.ShardLoader._collate

    def spy(self, batch, step):
        b = real(self, batch, step)
        if not hasattr(self, "spy_number"):     # not id(self): a freed loader's address can be reused
            self.spy_number = len({k for k, _, _ in seen})
        seen.append([self.spy_number, self.epoch, b["idx"].tolist()])
        return b
    return spy


if __name__ == "__main__":
    from maect import train
    out, args = sys.argv[1], sys.argv[2:]
    seen = []
    shard_loader.ShardLoader._collate = collate_spy(seen)
    train.main(args)
    with open(os.path.join(out, f"ids-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(seen, f)
