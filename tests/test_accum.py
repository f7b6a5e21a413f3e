"""Gradient accumulation across epoch ends. The rule (maect.train.run_mae): an optimizer step averages exactly
mae.accum_steps micro-batches of one epoch; the epoch's last (micro-batches mod accum_steps) micro-batches, which
cannot fill a window, are dropped before any forward or backward (as drop_last drops a partial batch), so no step
ever applies more or fewer than accum_steps micro-batches. Checked against a loop written here from that rule, on 1
rank (in-process) and on 2 ranks (torchrun, gloo): 44 images, global batch 8 = 2 micro-batches of 4, so an epoch
has 11 micro-batches, 5 steps and one dropped micro-batch."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maect import hub, train
from maect.validation import load_config
from maect.dataloading import build_loader, load_data
from maect.optim import build_optimizer, lr_factor, param_groups, set_lr, warmup_steps
from test_nnclr import TINY, run_train

N_IMAGES, EPOCHS = 44, 2


def image_folder(root) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:03d}.png"))
    return str(root)


def args_for(root, out) -> list[str]:
    return [*TINY, "stage=mae", "data.name=folder", f"data.root={root}", "mae.batch_size=8", "mae.accum_steps=2",
            f"mae.epochs={EPOCHS}", "mae.warmup_epochs=0.2", "log_every=1", "ckpt_every=0", "ckpt_epochs=0",
            f"out_dir={out}"]


def reference(cfg) -> dict:
    """The rule, written out: per step, accum micro-batches (loss / accum each) then one AdamW step; at an epoch
    end the micro-batches that cannot fill a window are not run. The same initial weights, data, noise and lr."""
    s, accum = cfg.mae, cfg.mae.accum_steps
    torch.manual_seed(cfg.seed)
    model = hub.model_from_cfg(cfg.model, decoder=True)
    micro = s.batch_size // accum
    loader = build_loader(load_data(cfg.data.name, cfg.data.root, "train"), cfg.data, img_size=cfg.model.img_size,
                          in_chans=cfg.model.in_chans, batch_size=micro, rank=0, world=1, seed=cfg.seed, num_views=s.num_views, ctaug=False,
                          crop_scale=s.crop_scale, device=torch.device("cpu"))
    spe = len(loader) // accum
    total, warm = round(s.epochs * spe), warmup_steps(s.warmup_epochs * spe)
    lr = train.mae_lr(s)
    opt, _ = build_optimizer(param_groups(model.named_parameters(), s.weight_decay), lr, fused=cfg.fused_optimizer,
                             device=torch.device("cpu"))
    L, step = model.patch_embed.num_patches, 0
    model.train()
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch, 0)
        batches = list(loader)[:spe * accum]
        for i, b in enumerate(batches):
            g = train.step_generator(cfg.seed, "mae", step * accum + i % accum)
            noise = torch.cat([torch.rand(micro, L, generator=g) for _ in b["views"]])
            loss, _, _ = model(torch.cat(b["views"]), s.mask_ratio, s.norm_pix_loss, noise)
            (loss / accum).backward()
            if i % accum == accum - 1:
                set_lr(opt, lr, lr_factor(step, total, warm))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
    assert step == total == EPOCHS * 5
    return model.state_dict()


def compare(got: dict, want: dict, atol: float) -> None:
    worst = max(((got[k] - v).abs().max().item(), k) for k, v in want.items())
    print(f"max |trainer - reference| = {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= atol, worst


def reference_of(root) -> dict:
    """reference() with the trainer's thread count, computed after the trainer's run in this process, so that both
    run the backends the run's start-up decided (kernels/dispatch.py): the same ops in the same order."""
    cfg = load_config(args_for(root, "/unused"))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)     # as the trainer: the same reduction order on the CPU
    try:
        return reference(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("imgs") / "train")


def test_accumulation_across_epoch_ends_one_rank(tmp_path, root):
    train.run(load_config(args_for(root, tmp_path)))
    ck = hub.load_checkpoint(str(tmp_path / "mae" / "checkpoint-final.pth"))
    assert ck["step"] == EPOCHS * 5
    compare(ck["model"], reference_of(root), 0.0)     # the same ops in the same order (fp32, one process): bitwise


@pytest.mark.slow
def test_accumulation_across_epoch_ends_two_ranks(tmp_path, root):
    run_train(args_for(root, tmp_path), nproc=2)
    ck = hub.load_checkpoint(str(tmp_path / "mae" / "checkpoint-final.pth"))
    assert ck["step"] == EPOCHS * 5
    compare(ck["model"], reference_of(root), 1e-5)    # DDP averages two half-batch gradients: float rounding only
