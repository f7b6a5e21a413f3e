"""How often maect's lightly bank picks another neighbour than lightly's own, and whether each differing pick is a near tie.

    python bench/swap_in_picks.py                  # bank 65536 x 128 (lightly's NNCLR example), 7680 rows in fp32
    python bench/swap_in_picks.py --rows 1024 --bank 4096 --dim 32

Picks: random normal rows (output) against a random normal bank, in batches of --batch rows, lightly 1.6.0's
NNMemoryBankModule vs maect.integrations.lightly.NNMemoryBankModule (update=False, the same bank), in fp32, with a
bf16 bank and output (both modules cast), and with the fp32 bank under bf16 autocast. For every row whose picks
differ: the exact (fp64) cosine gap between the two picked rows, and whether it lies within the rounding bound of
the dtype lightly ranked in (fp32: 2 (D + 8) u + 8 (D + 4) u, the bound both sides' fp32 normalise-and-dot obey,
u = 2^-24; bf16: 2^-6, bf16's rounding of similarities near 1 plus its rounding of the normalised rows).
Exit status 1 when a differing pick lies outside the bound.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

U = 2.0 ** -24


def picks(args, mode: str) -> dict:
    from lightly.models.modules import NNMemoryBankModule as Lightly

    from maect.integrations.lightly import NNMemoryBankModule as Ours
    g = torch.Generator().manual_seed(0)
    ref, ours = Lightly(size=(args.bank, args.dim)), Ours(size=(args.bank, args.dim))
    bank = torch.randn(args.bank, args.dim, generator=g)
    for m in (ref, ours):
        m.bank.copy_(bank)
    if mode == "bf16":
        ref, ours = ref.bfloat16(), ours.bfloat16()
    exact_bank = F.normalize(ref.bank.double(), dim=1)
    D = args.dim
    tol = 2.0 ** -6 if mode != "fp32" else 2 * (D + 8) * U + 8 * (D + 4) * U
    rows = differ = within = 0
    gaps = []
    for _ in range(-(-args.rows // args.batch)):
        x = torch.randn(args.batch, args.dim, generator=g)
        x = x.bfloat16() if mode == "bf16" else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            a, b = ref(x), ours(x)
        ia = (a.unsqueeze(1) == ref.bank.unsqueeze(0)).all(-1).float().argmax(1)
        ib = (b.unsqueeze(1) == ours.bank.unsqueeze(0)).all(-1).float().argmax(1)
        cos = F.normalize(x.double(), dim=1) @ exact_bank.t()
        d = (ia != ib).nonzero()[:, 0]
        for r in d.tolist():
            gap = abs(float(cos[r, ia[r]] - cos[r, ib[r]]))
            gaps.append(gap)
            within += gap <= tol
        rows, differ = rows + len(x), differ + len(d)
    return {"mode": mode, "rows": rows, "differ": differ, "within_bound": within, "bound": tol,
            "max_gap": max(gaps) if gaps else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows", type=int, default=7680, help="fp32 rows compared")
    p.add_argument("--bf16-rows", type=int, default=2048, help="rows compared in each bf16 mode")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bank {args.bank} x {args.dim}, "
          f"batch {args.batch}", flush=True)
    ok = True
    for mode, n in (("fp32", args.rows), ("bf16", args.bf16_rows), ("autocast", args.bf16_rows)):
        args_n = argparse.Namespace(**{**vars(args), "rows": n})
        t0 = time.perf_counter()
        res = picks(args_n, mode)
        ok &= res["within_bound"] == res["differ"]
        print(json.dumps(res), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"check: every differing pick within the rounding bound: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
