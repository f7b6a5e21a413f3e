"""FeatureQueue.lookup as the training loop calls it: both views in one call, the queue's storage dtype, and a query
row with no admissible neighbour (NaN) that must never silently select the last queue row."""
import pytest
import torch
import torch.nn.functional as F

from maect.heads import FeatureQueue, queue_dtype


def filled_queue(dtype=torch.float32, size=64, dim=8):
    q = FeatureQueue(size, dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    z = F.normalize(torch.randn(size, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    ids = torch.arange(size)
    q.enqueue(z, ids, ids % 5)
    return q


@pytest.mark.parametrize("k", [1, 5])
def test_one_call_for_both_views_equals_two_calls(k):
    """The loop looks up cat(z0, z1) once; the neighbours and picks equal two calls with the same generator stream."""
    q = filled_queue()
    g = torch.Generator().manual_seed(3)
    z0, z1 = F.normalize(torch.randn(2, 6, 8, generator=g), dim=2)
    ids = torch.arange(6) * 7
    nn0, i0 = q.lookup(z0, ids, k, generator=torch.Generator().manual_seed(9))
    g2 = torch.Generator().manual_seed(9)
    nn0b, i0b = q.lookup(z0, ids, k, generator=g2)
    nn1b, i1b = q.lookup(z1, ids, k, generator=g2)
    nn, i = q.lookup(torch.cat([z0, z1]), torch.cat([ids, ids]), k, generator=torch.Generator().manual_seed(9))
    assert torch.equal(i, torch.cat([i0b, i1b])) and torch.equal(nn, torch.cat([nn0b, nn1b]))
    assert not torch.any(q.ids[i] == torch.cat([ids, ids])), "a query found itself"


def test_nonfinite_query_gets_no_neighbour():
    """A NaN query row has no admissible entry (kernels.queue_topk: index -1): lookup returns index -1 and a NaN
    neighbour (so the loss is non-finite and the step is skipped), not queue row -1's features."""
    q = filled_queue()
    z = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    z[2, 0] = float("nan")
    nn, idx = q.lookup(z, torch.tensor([100, 101, 102, 103]), 3, generator=torch.Generator().manual_seed(0))
    assert idx[2] == -1 and torch.isnan(nn[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert (idx[keep] >= 0).all() and torch.equal(nn[keep], q.features[idx[keep]])


def test_bf16_storage():
    """nnclr.queue_dtype=bf16: features stored in bf16 (enqueue casts), neighbours returned in bf16, and a checkpoint
    of an fp32 queue loads into a bf16 one (and back)."""
    q16, q32 = filled_queue(torch.bfloat16), filled_queue(torch.float32)
    assert q16.features.dtype == torch.bfloat16 and torch.equal(q16.features, q32.features.to(torch.bfloat16))
    z = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    nn, idx = q16.lookup(z, torch.arange(5) + 500, 1)
    assert nn.dtype == torch.bfloat16 and torch.equal(nn, q16.features[idx])
    q16b = FeatureQueue(64, 8, dtype=torch.bfloat16)
    q16b.load_state_dict(q32.state_dict())
    assert torch.equal(q16b.features, q16.features)
    assert queue_dtype("auto", torch.device("cpu")) == torch.float32
    assert queue_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="queue_dtype='fp16'"):
        queue_dtype("fp16", torch.device("cpu"))
