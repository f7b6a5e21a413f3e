"""What kernels/dispatch.py measures for each op: its candidates on this device, the inputs (a bounded slice of the
call's own), the rule that compares a candidate with the reference, and the torch path a user would otherwise run.

queue_topk (contract: kernels/queue_topk.py)
    candidates: 'cpp' (compiled CPU op) on CPU, 'triton' on CUDA, 'ref' (queue_topk_ref) and 'torch'
    (queue_topk_torch: the torch path in the op's contract) everywhere, so no backend slower than it is picked
    torch path: 'torch mm+topk' = (q @ eᵀ).topk(k) in the input dtype (no exclusion: timed for the ratio only);
    on CUDA with fp32 inputs also 'official autocast' (normalise both, q @ eᵀ under bf16 autocast, the self-id mask,
    topk: the published NNCLR lookup as its training code runs it)
    slice: the first rows of the query, at most ROWS[device] rows and rows x Q <= SIMS[device] similarities
    rule (check_topk, the first bad row is reported): shapes and dtypes; padding (-inf / -1) exactly where the
    reference pads; no index out of range, repeated in a row, or excluded by id; each value within tol of the
    reference's value at its rank and of the similarity at its own index; values descending; where two indices
    differ at a rank their queue rows are not bitwise equal (equal rows tie exactly: the lower index must win).
    tol = 2 (D + 8) u (+ 8 (D + 4) u when normalized=False): both sides sum D fp32 products in different orders
    (u = 2^-24; the Triton kernel re-scores in fp32, see kernels/queue_topk.py).
masking ops (contracts: kernels/masking.py, kernels/masked_embed.py)
    candidates: the backends of MASKING_BACKENDS that can run here without the Triton interpreter (why_not)
    torch path: 'ref', MAE's own code
    inputs: the call's first ROWS_MASKING[device] samples, fresh noise from a private generator (the global RNG
    is not advanced: measure and table runs draw the same masks); timed forward + backward when the call records
    gradients (on detached copies of the inputs), forward only otherwise
    rule: mask and ids_restore exactly equal; tokens exactly equal (they are copies, and decoder_input's single
    rounded add is exact), except masked_patch_embed's, within embed_error_bound (kernels/masked_embed.py)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch as _d
from . import masked_embed as _embed
from . import queue_topk as _qt

ROWS = {"cpu": 256, "cuda": 1 << 16}
SIMS = {"cpu": 1 << 20, "cuda": 1 << 30}
ROWS_MASKING = {"cpu": 32, "cuda": 1 << 16}
_U = 2.0 ** -24


def _dev(t: Tensor) -> str:
    return "cuda" if t.device.type == "cuda" else "cpu"


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dt, str(dt).replace("torch.", ""))


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------- queue_topk
def topk_shape(B: int, Q: int, D: int, k: int, ids: bool) -> str:
    """queue_topk's shape class: the tuned-config buckets (kernels/queue_topk.py shape_class) + D and exclusion."""
    kb = 1 if k == 1 else (32 if k <= 32 else 128)
    return f"k{kb}-B{_qt._bucket(B, _qt.B_BUCKETS)}-Q{_qt._bucket(Q, _qt.Q_BUCKETS)}-D{_pow2(D)}" + ("-ids" if ids else "")


def topk_key(query: Tensor, queue: Tensor, k: int, exclude_ids) -> str:
    return _d.make_key(query.device, "queue_topk", _dtype_name(query.dtype),
                       topk_shape(query.shape[0], queue.shape[0], query.shape[1], k, exclude_ids is not None))


def check_topk(query, queue, k, exclude_ids, queue_ids, normalized, out, ref) -> str | None:
    """None if out = (values, indices) follows queue_topk's rules on these inputs, else the first bad row."""
    v, i = out
    rv, ri = ref
    if not (isinstance(v, Tensor) and isinstance(i, Tensor)) or v.shape != rv.shape or i.shape != ri.shape:
        return f"output shapes {getattr(v, 'shape', type(v))}, {getattr(i, 'shape', type(i))}; expected {tuple(rv.shape)}"
    if v.dtype != torch.float32 or i.dtype != torch.int64:
        return f"output dtypes {v.dtype}, {i.dtype}; expected torch.float32, torch.int64"
    if v.shape[0] == 0:
        return None
    B, Q, D = query.shape[0], queue.shape[0], query.shape[1]
    sim = _qt.similarity_ref(query, queue, exclude_ids, queue_ids, normalized)
    tol = 2 * (D + 8) * _U + (8 * (D + 4) * _U if not normalized else 0.0)
    v, i = v.to(sim.device), i.to(sim.device)
    pad, rpad = i < 0, ri < 0
    reasons = []
    bad = (pad != rpad).any(1)
    reasons.append(("padding (-1) differs from the reference's", bad))
    reasons.append(("index out of range", ((i >= Q) | (i < -1)).any(1)))
    ic = i.clamp(0, Q - 1)
    srt = ic.masked_fill(pad, -1).sort(1).values
    reasons.append(("an index repeated", ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1)))
    if exclude_ids is not None:
        hit = queue_ids.long().to(sim.device)[ic] == exclude_ids.long().to(sim.device)[:, None]
        reasons.append(("an index excluded by id returned", (hit & ~pad).any(1)))
    fin = ~rpad & ~pad
    at = sim.gather(1, ic)
    reasons.append((f"a value differs from the reference's by more than {tol:.2g}",
                    (((v - rv).abs() > tol) & fin).any(1)))
    reasons.append(("a value differs from the similarity at its index",
                    (((at - v).abs() > tol) & fin).any(1) | ((at == float("-inf")) & ~pad).any(1)))
    reasons.append(("padding values are not -inf", ((v != float("-inf")) & pad).any(1)))
    reasons.append(("values not descending", ((v[:, 1:] > v[:, :-1] + tol) & fin[:, 1:]).any(1)))
    diff = (i != ri) & fin
    if diff.any():
        qrows = queue.reshape(Q, -1)
        same = (qrows[ic] == qrows[ri.clamp(0, Q - 1)]).all(-1) & diff
        reasons.append(("tie rule: an equal queue row with a lower index ranks after a higher one", same.any(1)))
    for why, rows in reasons:
        if rows.any():
            b = int(rows.nonzero()[0, 0])
            return (f"row {b}: {why}: indices {i[b, :8].tolist()} values {[round(x, 6) for x in v[b, :8].tolist()]}; "
                    f"reference {ri[b, :8].tolist()} {[round(x, 6) for x in rv[b, :8].tolist()]}")
    return None


def queue_topk_torch(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                     queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """The torch path as a backend in queue_topk's contract (kernels/queue_topk.py): the fp32 similarity matrix
    (queue_topk_ref's similarity_ref: the same matmul and exclusion; its non-finite masking only for the rows that
    need it), then one torch.topk of k + 1 per row. A row whose k + 1 best are finite and whose k-th value is strictly above the (k + 1)-th holds
    exactly its k best, ordered by value, then index (the tie rule); the other rows (a tie at the k-th value, fewer
    than k + 1 admissible entries, or k = Q) are selected by the reference's select_topk_ref. Costs one [B, Q]
    matrix, as the torch path; the same values as the reference, bitwise, on the same inputs."""
    _qt.check_inputs(query, queue, k, exclude_ids, queue_ids)
    B, Q = query.shape[0], queue.shape[0]
    if B == 0 or k >= Q:
        return _qt.select_topk_ref(_qt.similarity_ref(query, queue, exclude_ids, queue_ids, normalized), k)
    q, e = query.float(), queue.float()
    if not normalized:
        q, e = F.normalize(q, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    sim = q @ e.t()                          # similarity_ref's product; its masks only where a row needs them:
    if exclude_ids is not None:              # topk ranks NaN first, so a NaN / inf among a row's k + 1 best
        sim.masked_fill_(exclude_ids.view(-1, 1).long() == queue_ids.view(1, -1).long(), float("-inf"))
    v, i = sim.topk(k + 1, dim=1)            # sends the row to the reference's select below
    redo = ~torch.isfinite(v).all(1) | (v[:, k] == v[:, k - 1])
    v, i = v[:, :k], i[:, :k]
    i, by_index = i.sort(dim=1)                                   # equal values: the lower index first
    v, by_value = v.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    i = i.gather(1, by_value)
    if bool(redo.any()):
        rows = redo.nonzero()[:, 0]
        part = sim[rows]
        v[rows], i[rows] = _qt.select_topk_ref(part.masked_fill(~torch.isfinite(part), float("-inf")), k)
    return v, i


def official_lookup(q: Tensor, e: Tensor, k: int, ids, qids):
    """The published NNCLR lookup: normalise both, the full similarity matrix, the self-id mask, topk."""
    sim = F.normalize(q, dim=-1) @ F.normalize(e, dim=-1).T
    if ids is not None:
        sim.masked_fill_(qids[None, :] == ids[:, None], float("-inf"))
    return sim.topk(k, dim=1)


def topk_problem(query: Tensor, queue: Tensor, k: int, exclude_ids, queue_ids, normalized: bool,
                 impls: dict, key: str | None = None) -> _d.Problem:
    """impls: {backend name: function with queue_topk's signature}, the reference excluded."""
    dev = _dev(query)
    Q = queue.shape[0]
    rows = max(1, min(query.shape[0], ROWS[dev], SIMS[dev] // max(1, Q)))
    q, ex = query[:rows], (exclude_ids[:rows] if exclude_ids is not None else None)
    args = (q, queue, k, ex, queue_ids, normalized)
    vrows = min(rows, 256)
    vargs = (query[:vrows], queue, k, (ex[:vrows] if ex is not None else None), queue_ids, normalized)

    def verify(out, ref):
        return check_topk(*vargs, out, ref)

    def cand(name, fn):
        return _d.Candidate(name, run=lambda: fn(*vargs), timed=lambda: fn(*args))

    baselines = [_d.Candidate("torch mm+topk", run=lambda: None, timed=lambda: (q @ queue.T).topk(k, dim=1),
                              baseline=True)]
    if dev == "cuda" and query.dtype == torch.float32:
        def autocast_official():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return official_lookup(q, queue, k, ex, queue_ids)
        baselines.append(_d.Candidate("official autocast", run=lambda: None, timed=autocast_official, baseline=True))
    return _d.Problem(op="queue_topk", key=key or topk_key(query, queue, k, exclude_ids), device=query.device,
                      reference=cand("ref", _qt.queue_topk_ref), candidates=[cand(n, f) for n, f in impls.items()],
                      verify=verify, baselines=baselines, shape=f"B={rows} Q={Q} D={query.shape[1]} k={k}")


# ------------------------------------------------------------------------------------------------- masking
def masking_dtype(t: Tensor) -> str:
    """The dtype an op computes in: the autocast dtype where autocast is on for t's device, else t's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _dtype_name(torch.get_autocast_dtype(dev))
    return _dtype_name(t.dtype)


def masking_key(op: str, t: Tensor, L: int, D: int, train: bool) -> str:
    from . import shape_class
    return _d.make_key(t.device, op, masking_dtype(t), f"{shape_class(L, D)}-{'fwd+bwd' if train else 'fwd'}")


def _clone(t: Tensor | None, n: int | None = None) -> Tensor | None:
    """A detached copy (its first n rows when n is given) that records gradients where t does."""
    if t is None:
        return None
    c = (t[:n] if n is not None else t).detach().clone()
    return c.requires_grad_(t.requires_grad and t.dtype.is_floating_point)


def _grad_run(fn, grad: bool):
    """fn's forward, plus the backward of its first output's sum when training (what a step times)."""
    def run():
        out = fn()
        first = out[0] if isinstance(out, tuple) else out
        if grad and first.requires_grad:
            first.float().sum().backward()
        return out
    return run


def _exact(names, out, ref) -> str | None:
    """The first sample where any output differs from the reference's (every output exact)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for name, a, b in zip(names, outs, refs):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name}: shape/dtype {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}"
        neq = (a != b) & ~(torch.isnan(a) & torch.isnan(b)) if a.dtype.is_floating_point else a != b
        if neq.any():
            n = int(neq.reshape(a.shape[0], -1).any(1).nonzero()[0, 0])
            return f"sample {n}: {name} differs from the reference's ({int(neq[n].sum())} entries)"
    return None


def _noise(N: int, L: int, device) -> Tensor:
    g = torch.Generator(device=device).manual_seed(0)       # private: the global RNG is not advanced
    return torch.rand(N, L, device=device, generator=g)


def masking_problem(op: str, key: str, args: tuple, impls: dict, ref_fn, train: bool, shape: str = "") -> _d.Problem:
    """args: the measurement inputs in the op's signature order (masking_inputs: a slice of the call's, cloned);
    impls: {backend name: function with the reference's signature}, the reference excluded."""
    names = {"random_masking": ("x_visible", "mask", "ids_restore"), "unshuffle": ("out",),
             "decoder_input": ("out",), "masked_patch_embed": ("x_visible", "mask", "ids_restore")}[op]
    first = args[0]

    def verify(out, ref):
        if op != "masked_patch_embed":
            return _exact(names, out, ref)
        bad = _exact(names[1:], out[1:], ref[1:])
        if bad:
            return bad
        x, rx = out[0].detach(), ref[0].detach()
        if x.shape != rx.shape or x.dtype != rx.dtype:
            return f"x_visible: shape/dtype {tuple(x.shape)} {x.dtype}, expected {tuple(rx.shape)} {rx.dtype}"
        imgs, w, b, pos = (t.detach() if t is not None else None for t in args[:4])
        K = x.shape[1]
        ids_keep = torch.argsort(ref[2], dim=1)[:, :K]
        mm = _embed.gemm_dtype(imgs, w)
        bound = _embed.embed_error_bound(imgs, w, b, pos, ids_keep, mm, rx.dtype)
        over = ((x.double() - rx.double()).abs() > bound) | (torch.isnan(x) != torch.isnan(rx))
        if over.any():
            n = int(over.reshape(x.shape[0], -1).any(1).nonzero()[0, 0])
            worst = float(((x.double() - rx.double()).abs() - bound)[n].max())
            return f"sample {n}: x_visible beyond the derived error bound (by {worst:.3g}; {int(over[n].sum())} entries)"
        return None

    def cand(name, fn):
        return _d.Candidate(name, run=lambda: _fwd(fn), timed=_grad_run(lambda: fn(*args), train))

    def _fwd(fn):
        with torch.no_grad():
            return fn(*args)

    return _d.Problem(op=op, key=key, device=first.device, reference=cand("ref", ref_fn),
                      candidates=[cand(n, f) for n, f in impls.items()], verify=verify,
                      shape=f"{shape} ({'forward + backward' if train else 'forward'})".strip())


def masking_inputs(op: str, args: tuple) -> tuple[tuple, str]:
    """The measurement inputs for a call with `args` (the op's signature order): its first rows_for samples,
    detached copies that record gradients where the originals do, and explicit noise (the call's slice, else a
    private draw) so that every backend masks the same patches. Returns (inputs, a shape string for log lines)."""
    if op == "masked_patch_embed":
        imgs, w, b, pos, ratio, noise = args
        n = rows_for(imgs)
        L = (imgs.shape[2] // w.shape[2]) * (imgs.shape[3] // w.shape[3])
        nz = noise[:n] if noise is not None else _noise(n, L, imgs.device)
        return ((_clone(imgs, n), _clone(w), _clone(b), _clone(pos), ratio, nz),
                f"N={n} {tuple(imgs.shape[1:])} patch {w.shape[2]} D={w.shape[0]} L={L}")
    if op == "random_masking":
        x, ratio, noise = args
        n = rows_for(x)
        nz = noise[:n] if noise is not None else _noise(n, x.shape[1], x.device)
        return (_clone(x, n), ratio, nz), f"N={n} L={x.shape[1]} D={x.shape[2]}"
    if op == "unshuffle":
        x, tok, ids = args
        n = rows_for(x)
        return (_clone(x, n), _clone(tok), ids[:n]), f"N={n} K={x.shape[1]} L={ids.shape[1]} D={x.shape[2]}"
    x, tok, ids, pos, cls = args
    n = rows_for(x)
    return ((_clone(x, n), _clone(tok), ids[:n], _clone(pos), cls),
            f"N={n} K={x.shape[1] - int(cls)} L={ids.shape[1]} D={x.shape[2]}")


def rows_for(t: Tensor) -> int:
    return min(t.shape[0], ROWS_MASKING[_dev(t)])


def records_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
