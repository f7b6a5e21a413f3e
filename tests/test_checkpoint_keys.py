"""Wrapped checkpoints: state dicts saved from torch.compile(DDP(model)), DDP(torch.compile(model)), timm's ModelEmaV3
and torch.optim.swa_utils.AveragedModel, and random nestings of containers and key prefixes, load through
maect.hub.load_encoder (the path every loader takes: training's init=, evaluation, export, viz) and give bitwise the
features of the unwrapped model. When no encoder is found, the refusal names the prefixes it saw.

DDP runs in a one-process gloo group on the CPU; torch.compile uses backend='eager' (only its state-dict keys matter,
the compiled model is never run).
"""
import random

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from maect import hub
from maect.models.vit import build_model

# width 192 -> 3 heads is what hub infers from a state dict without a maect config; 32 px / patch 8 -> 16 patches
SIZE = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=4)


def mae(seed: int = 0):
    """A small MAE (encoder + decoder, as stage 1 saves it) with every weight perturbed, so a wrong or partial mapping
    changes the features."""
    torch.manual_seed(seed)
    m = build_model("custom", decoder=True, **SIZE)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "pos_embed" not in n:
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def features(model):
    return model.eval().forward_features(images())


def assert_loads_bitwise(ckpt, want, tmp_path, use_ema=False, name="c.pth"):
    """Save ckpt like maect does, load it through hub.load_encoder and compare the features to `want`'s bit for bit."""
    path = str(tmp_path / name)
    hub.save_checkpoint(ckpt, path)
    enc, info = hub.load_encoder(path, use_ema=use_ema)
    print(hub.describe(info))
    got, ref = features(enc), features(want)
    assert torch.equal(got, ref), (got - ref).abs().max()
    return info


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group (DDP needs one); torn down after the module unless it already existed."""
    mine = not dist.is_initialized()
    if mine:
        import tempfile
        f = tempfile.NamedTemporaryFile(delete=False)
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


@pytest.mark.parametrize("order", ["compile(DDP(model))", "DDP(compile(model))"])
def test_compile_and_ddp_in_either_order(gloo, tmp_path, order):
    model = mae(0)
    wrapped = (torch.compile(DDP(model), backend="eager") if order.startswith("compile")
               else DDP(torch.compile(model, backend="eager")))
    sd = wrapped.state_dict()
    first = next(iter(sd))
    assert first.startswith("_orig_mod.module." if order.startswith("compile") else "module._orig_mod."), first
    info = assert_loads_bitwise({"model": sd, "epoch": 3}, model, tmp_path)
    assert any("prefix removed" in n for n in info["notes"]) and info["ema"] is False


def test_averaged_model_ema(tmp_path):
    """torch.optim.swa_utils.AveragedModel (an EMA via get_ema_multi_avg_fn): 'module.' keys and 'n_averaged';
    under 'model_ema' beside the online weights (use_ema picks which), and alone."""
    model = mae(0)
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for seed in (1, 2):                                   # the average now differs from the online weights
        with torch.no_grad():
            for p, q in zip(model.parameters(), mae(seed).parameters()):
                p.copy_(q)
        avg.update_parameters(model)
    sd = avg.state_dict()
    assert "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged")
    assert not torch.equal(features(avg.module), features(model))
    assert_loads_bitwise({"model": model.state_dict(), "model_ema": sd}, model, tmp_path, use_ema=False)
    info = assert_loads_bitwise({"model": model.state_dict(), "model_ema": sd}, avg.module, tmp_path, use_ema=True)
    assert info["ema"] is True
    info = assert_loads_bitwise(sd, avg.module, tmp_path, name="avg.pth")
    assert any("n_averaged" in n for n in info["notes"])


def test_timm_model_ema(gloo, tmp_path):
    """timm's ModelEmaV3 of a DDP model (its copy keeps DDP's 'module.' and adds its own), saved under
    'state_dict_ema' beside a DDP 'state_dict', as timm's train script lays out a checkpoint."""
    from timm.utils import ModelEmaV3
    model = mae(0)
    ddp = DDP(model)
    ema = ModelEmaV3(ddp, decay=0.5)
    with torch.no_grad():
        for p, q in zip(model.parameters(), mae(3).parameters()):
            p.copy_(q)
    ema.update(ddp)
    esd = ema.state_dict()
    assert next(iter(esd)).startswith("module.module."), next(iter(esd))
    ckpt = {"state_dict": ddp.state_dict(), "state_dict_ema": esd, "epoch": 1}
    assert_loads_bitwise(ckpt, model, tmp_path, use_ema=False)
    info = assert_loads_bitwise(ckpt, ema.module.module, tmp_path, use_ema=True)
    assert info["ema"] is True and any("EMA encoder ('state_dict_ema.module.module')" in n for n in info["notes"])


def nest(sd: dict, parts: list[tuple[str, bool]]) -> dict:
    """Wrap sd by parts, innermost last: (name, True) a container {name: ...}, (name, False) a key prefix 'name.'."""
    for name, container in reversed(parts):
        sd = {name: sd} if container else {f"{name}.{k}": v for k, v in sd.items()}
    return sd


def test_random_nestings_of_containers_and_prefixes(tmp_path):
    """40 random orders and depths (1 to 5) of containers and prefixes, each giving back exactly the same tensors
    (find_state_dict) and, for a few, the same features through load_encoder."""
    model = mae(0)
    sd = model.state_dict()
    rng = random.Random(0)
    names = ["module", "_orig_mod", "model", "state_dict", "encoder"]
    for i in range(40):
        parts = [(rng.choice(names), rng.random() < 0.5) for _ in range(rng.randint(1, 5))]
        ckpt = nest(sd, parts)
        if isinstance(ckpt, dict) and parts[0][1]:
            ckpt["epoch"] = 7                                  # bookkeeping beside the outermost container
        got, notes, ema = hub.find_state_dict(ckpt)
        assert got.keys() == sd.keys() and all(got[k] is sd[k] for k in sd), parts
        assert not ema and any("prefix removed" in n for n in notes), (parts, notes)
        if i < 3:
            assert_loads_bitwise(ckpt, model, tmp_path, name=f"n{i}.pth")


def test_refusal_lists_the_prefixes_it_saw():
    sd = mae(0).state_dict()
    moco = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                           **{f"module.momentum_encoder.{k}": v for k, v in sd.items()}}, "epoch": 100, "arch": "vit"}
    with pytest.raises(ValueError) as e:
        hub.find_state_dict(moco)
    msg = str(e.value)
    print(msg)
    assert "no ViT encoder weights found" in msg and "top-level keys: ['state_dict', 'epoch', 'arch']" in msg
    assert "'state_dict.module.base_encoder.'" in msg and "'state_dict.module.momentum_encoder.'" in msg
    assert "not known wrappers" in msg
    with pytest.raises(ValueError, match=r"prefixes seen.*'model\.fc\.' \(1\)"):
        hub.find_state_dict({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 0})


def test_two_different_encoders_are_refused_and_copies_are_not():
    a, b = mae(0).state_dict(), mae(1).state_dict()
    with pytest.raises(ValueError, match=r"several different ViT encoders.*'model\.'.*'encoder\.'"):
        hub.find_state_dict({"model": a, "encoder": b})
    got, _, _ = hub.find_state_dict({"model": a, "state_dict": {f"module.{k}": v.clone() for k, v in a.items()}})
    assert all(got[k] is a[k] for k in a)
    got, notes, ema = hub.find_state_dict({"model_ema": b})             # an EMA encoder alone
    assert ema and all(got[k] is b[k] for k in b) and any("only an EMA" in n for n in notes)
    got, notes, ema = hub.find_state_dict({"model": a}, use_ema=True)    # asked for EMA, none there
    assert not ema and any("EMA encoder requested" in n for n in notes)
