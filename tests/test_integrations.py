"""maect.integrations against the code it replaces: lightly's own NNMemoryBankModule / NNCLR pieces (the installed
package, a test dependency), the NNCLR find_nn of solo-learn and of the published MAE-CT heads, and MAE's
random_masking (both written here from their published algorithms).

Neighbour rule (the adapters' stated contract): maect picks the bank row with the largest fp32 cosine similarity,
lower index first among equal ones. The replaced code ranks the same similarities computed in another summation
order (fp32), or rounded to bf16. So the two may pick differently only between rows whose exact (fp64)
similarities lie within that rounding (fp32: FP32_TOL, the two sides' normalise-and-dot error; bf16: BF16_TOL);
every row whose best and second-best exact similarities are further apart must give the identical neighbour
(assert_rule). A pick at position p of a top-k list (MAE-CT's random pick) obeys the same rule with twice the
bound: the p-th largest of two value vectors within e of each other are within e of each other (agree_or_near_tie).
A training curve through such picks (lightly's NNCLR steps) is compared exactly up to the first step whose picks
differ (a near tie, by the rule), and not after it.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightly  # noqa: F401  (a test dependency: setup.py's test extra pins lightly==1.6.0)
from lightly.loss import NTXentLoss
from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead
from lightly.models.modules import NNMemoryBankModule as LightlyBank
from lightly.models.utils import most_similar_index as lightly_most_similar_index

from maect.integrations import lightly as ml
from maect.integrations import mae, nnclr_find_nn

ROOT = Path(__file__).resolve().parents[1]
BF16_TOL = 2.0 ** -6      # bf16 similarity rounding (ulp 2^-8 near 1) plus bf16 normalisation of the rows


def fp32_tol(D: int, normalize: bool = True) -> float:
    """Two fp32 computations of one cosine (or dot product of unit rows: normalize=False) differ by at most this:
    D products and their sum, each side within (D + 8) u of the exact value, plus 4 (D + 4) u per side for the
    normalisation (kernels/ops/queue_topk.py check_topk's bound; u = 2^-24)."""
    return 2 * (D + 8) * 2.0 ** -24 + (8 * (D + 4) * 2.0 ** -24 if normalize else 0.0)


def agree_or_near_tie(exact, got, want, tol, position=False) -> int:
    """Index picks got / want [B] of two computations of the similarities `exact` [B, Q] (fp64): equal, or a near
    tie: exact similarities within tol (top-1), within 2 tol (a pick at a position of a top-k list). Returns the
    number of rows that differ (each a near tie)."""
    d = got != want
    gap = (exact.gather(1, got.view(-1, 1)) - exact.gather(1, want.view(-1, 1)))[:, 0].abs()
    bound = 2 * tol if position else tol
    assert bool((gap[d] <= bound).all()), f"picks differ beyond rounding: gaps {gap[d].tolist()} > {bound:.3g}"
    return int(d.sum())


def test_import_does_not_import_lightly():
    code = ("import sys, maect, maect.kernels, maect.integrations, maect.integrations.mae; "
            "assert 'lightly' not in sys.modules, sorted(m for m in sys.modules if 'lightly' in m); print('clean')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def pair(Q: int, D: int, seed: int = 0, dtype=torch.float32):
    """lightly's module and maect's on one bank (lightly's own random unit-row initialisation)."""
    torch.manual_seed(seed)
    ref = LightlyBank(size=(Q, D)).to(dtype)
    ours = ml.NNMemoryBankModule(size=(Q, D)).to(dtype)
    ours.bank.copy_(ref.bank)              # non-persistent buffers (not in the state dict): copied by hand
    ours.bank_ptr.copy_(ref.bank_ptr)
    return ref, ours


def row_index(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index of each returned row in the bank (the bank rows are distinct in the cases that call this)."""
    eq = (rows.unsqueeze(1) == bank.unsqueeze(0)).all(-1)
    assert bool((eq.sum(1) == 1).all()), "returned rows must be bank rows, each found once"
    return eq.float().argmax(1)


def exact_cos(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=1) @ F.normalize(bank.double(), dim=1).t()


def assert_rule(x, bank, got_ref, got_ours, tol):
    """The stated neighbour rule for rounded (bf16) similarities; returns the number of well-separated rows."""
    cos = exact_cos(x, bank)
    i_ref, i_ours = row_index(got_ref, bank), row_index(got_ours, bank)
    best = cos.max(1).values
    c_ours = cos.gather(1, i_ours.view(-1, 1))[:, 0]
    c_ref = cos.gather(1, i_ref.view(-1, 1))[:, 0]
    assert torch.all(c_ours >= best - 1e-5), "maect must pick the most similar row (fp32 search)"
    assert torch.all((c_ours - c_ref).abs() <= tol), "picks differ by more than lightly's rounding"
    top2 = cos.topk(2, dim=1).values
    separated = (top2[:, 0] - top2[:, 1]) > tol
    assert torch.equal(i_ref[separated], i_ours[separated]), "well-separated rows must give the same neighbour"
    return int(separated.sum())


@pytest.mark.parametrize("B", [1, 64, 300])
def test_lightly_bank_random_fp32(B):
    """fp32: the same neighbour as lightly on every row whose best exact similarity leads by more than FP32_TOL
    (assert_rule); a row within it may pick the other row of the near tie."""
    ref, ours = pair(4096, 32, seed=B)
    x = torch.randn(B, 32) * 3
    assert_rule(x, ref.bank, ref(x), ours(x), fp32_tol(32))
    x[0] = float("nan")                    # no finite similarity: bank row 0, lightly's argmax of an all-NaN row
    got_ref, got_ours = ref(x), ours(x)
    assert torch.equal(got_ref[0], ref.bank[0]) and torch.equal(got_ours[0], ref.bank[0])
    if B > 1:
        assert_rule(x[1:], ref.bank, got_ref[1:], got_ours[1:], fp32_tol(32))
    x_bf = x.bfloat16()                    # a bf16 output with the fp32 bank: searched in fp32 (lightly raises)
    with pytest.raises(RuntimeError):
        ref(x_bf)
    got_ref, got_ours = ref(x_bf.float()), ours(x_bf)
    assert torch.equal(got_ours[0], got_ref[0])
    if B > 1:
        assert_rule(x_bf[1:], ref.bank, got_ref[1:], got_ours[1:], fp32_tol(32))


def test_lightly_bank_bf16_module_and_autocast():
    ref, ours = pair(4096, 32, seed=1, dtype=torch.bfloat16)
    x = torch.randn(256, 32).bfloat16()
    got_ref, got_ours = ref(x), ours(x)
    assert got_ours.dtype == got_ref.dtype == torch.bfloat16
    assert assert_rule(x, ref.bank, got_ref, got_ours, BF16_TOL) > 64
    ref, ours = pair(4096, 32, seed=2)    # fp32 bank, bf16 autocast (lightly's einsum then runs in bf16)
    x = torch.randn(256, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_ref, got_ours = ref(x), ours(x)
    assert got_ours.dtype == got_ref.dtype == torch.float32
    assert assert_rule(x, ref.bank, got_ref, got_ours, BF16_TOL) > 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lightly_bank_duplicates_and_ties(dtype):
    ref, ours = pair(512, 16, seed=3, dtype=dtype)
    e = ref.bank[:100].clone()
    # exact ties between distinct rows: 2e has e's cosine to the bit (a power-of-two scale); the scaled copy sits at
    # the lower index for rows 0..49 and at the higher one for rows 50..99, so the tie rule shows in the output
    bank = ref.bank.clone()
    bank[100:150], bank[0:50] = e[:50], 2 * e[:50]
    bank[150:200] = 2 * e[50:]
    bank[200:300] = e                      # duplicated rows (rows 0..99 again, bitwise)
    bank[300:316] = torch.eye(16, dtype=dtype)
    for m in (ref, ours):
        m.bank.copy_(bank)
    x = torch.cat([e, bank[300:316]])
    got_ref, got_ours = ref(x), ours(x)
    assert torch.equal(got_ref, got_ours)
    assert torch.equal(got_ours[:50], 2 * e[:50])                   # the lower index wins: the 2e copy at 0..49
    assert torch.equal(ml.nearest_index(x[:100], bank)[50:], torch.arange(50, 100))
    ref, ours = pair(32, 16, dtype=dtype)  # one-hot rows, and 3x them: e_r + e_(r+1) ties four rows
    eye = torch.eye(16, dtype=dtype)
    for m in (ref, ours):
        m.bank.copy_(torch.cat([3 * eye, eye]))
    x = eye[:15] + eye[1:]
    assert torch.equal(ref(x), ours(x)) and torch.equal(ours(x), 3 * eye[:15])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lightly_bank_update_sequence_wraps(dtype):
    ref, ours = pair(1000, 16, seed=4, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    separated = 0
    for step in range(26):                 # 96-row batches: the bank wraps twice, dropping the rows past its end
        x = torch.randn(96, 16, generator=g).to(dtype)
        update = step % 4 != 1
        bank_before = ref.bank.clone()
        got_ref, got_ours = ref(x, update=update), ours(x, update=update)
        separated += assert_rule(x, bank_before, got_ref, got_ours, fp32_tol(16) if dtype == torch.float32
                                 else BF16_TOL)
        assert torch.equal(ref.bank, ours.bank) and torch.equal(ref.bank_ptr, ours.bank_ptr), step
    assert int(ours.bank_ptr) != 0 and separated > 26 * 20


def test_lightly_bank_errors():
    with pytest.raises(ValueError, match="size=0"):
        ml.NNMemoryBankModule(size=0)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        ml.NNMemoryBankModule(size=(16, 4))(torch.randn(2, 5))
    with pytest.raises(ValueError, match="int64"):
        ml.NNMemoryBankModule(size=(16, 4))(torch.zeros(2, 4, dtype=torch.int64))


def test_lightly_most_similar_index_exact():
    """Exact ties (a row and 4x it: the same cosine to the bit) go to the lower index in both; the other picks
    follow the rule (equal unless a near tie within FP32_TOL)."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 20, 8, generator=g), torch.randn(3, 30, 8, generator=g)
    y[:, 10] = y[:, 3] * 4                 # exact ties: lower index first in both
    x[:, :5] = y[:, 3:4]
    got, want = ml.most_similar_index(x, y), lightly_most_similar_index(x, y)
    assert torch.equal(got[:, :5], want[:, :5]) and bool((got[:, :5] == 3).all())
    for b in range(3):
        agree_or_near_tie(exact_cos(x[b], y[b]), got[b], want[b], fp32_tol(8))


class TinyNNCLR(torch.nn.Module):
    """lightly's NNCLR example model (its heads), on a tiny backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU())
        self.projection_head = NNCLRProjectionHead(32, 64, 16)
        self.prediction_head = NNCLRPredictionHead(16, 64, 16)

    def forward(self, x):
        z = self.projection_head(self.backbone(x))
        return z.detach(), self.prediction_head(z)


def test_lightly_nnclr_steps_same_losses():
    torch.manual_seed(7)
    model = TinyNNCLR()
    models = [model, copy.deepcopy(model)]
    banks = pair(160, 16, seed=8)
    criterion = NTXentLoss(temperature=0.1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.06) for m in models]
    g = torch.Generator().manual_seed(9)
    losses = [[], []]
    for step in range(6):                  # 6 x 32 rows: the 160-row bank wraps
        x0, x1 = torch.randn(32, 3, 4, 4, generator=g), torch.randn(32, 3, 4, 4, generator=g)
        picks = []
        for i, (m, bank, opt) in enumerate(zip(models, banks, opts)):
            (z0, p0), (z1, p1) = m(x0), m(x1)
            before = bank.bank.clone()
            n0, n1 = bank(z0, update=False), bank(z1, update=True)
            picks.append((z0, z1, before, row_index(n0, before), row_index(n1, before)))
            loss = 0.5 * (criterion(n0, p1) + criterion(n1, p0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
        (z0, z1, before, a0, a1), (_, _, before_b, b0, b1) = picks
        assert torch.equal(before, before_b) and torch.equal(z0, picks[1][0]) and torch.equal(z1, picks[1][1])
        differ = (agree_or_near_tie(exact_cos(z0, before), b0, a0, fp32_tol(16)) +
                  agree_or_near_tie(exact_cos(z1, before), b1, a1, fp32_tol(16)))
        print(f"step {step + 1}: losses {losses[0][-1]} {losses[1][-1]}, picks differing at a near tie: {differ}")
        if differ:                         # the two runs train on different neighbours from here on
            break
        assert losses[0][-1] == losses[1][-1], step        # the same picks: the same ops, bitwise
    assert all(torch.isfinite(torch.tensor(losses[0])))
    if step == 5 and not differ:
        assert torch.equal(banks[0].bank, banks[1].bank)


# ---- NNCLR find_nn: solo-learn and MAE-CT, written from their published algorithms ----------------------------

def solo_find_nn(z, queue):
    idx = (z @ queue.T).max(dim=1)[1]
    return idx, queue[idx]


def maect_head_find_nn(z, queue, queue_id, ids, topk):
    sim = z @ queue.T
    sim[queue_id[None, :] == ids[:, None]] = -1.0
    if topk == 0:
        idx = sim.max(dim=1)[1]
    else:
        cand = sim.topk(topk, dim=1)[1]
        idx = cand[torch.arange(z.shape[0]), torch.randint(size=(z.shape[0],), high=topk)]
    return idx, queue[idx]


def queue_case(B=64, Q=2048, D=32, seed=10):
    g = torch.Generator().manual_seed(seed)
    queue = F.normalize(torch.randn(Q, D, generator=g), dim=1)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    queue_id = torch.randint(0, 10 ** 6, (Q,), generator=g)
    ids = torch.randint(0, 10 ** 6, (B,), generator=g)
    queue[:B // 2] = z[:B // 2]            # half the rows have their own entry in the queue: it must be excluded
    queue_id[:B // 2] = ids[:B // 2]
    return z, queue, queue_id, ids


def test_nnclr_find_nn_solo_learn():
    """The same index as solo-learn's max, except at a near tie within two fp32 dot products' rounding."""
    z, queue, _, _ = queue_case()
    idx, nn = nnclr_find_nn(z, queue)
    ref_idx, ref_nn = solo_find_nn(z, queue)
    agree_or_near_tie(z.double() @ queue.double().T, idx, ref_idx, fp32_tol(32, normalize=False))
    assert torch.equal(nn, queue[idx]) and idx.dtype == torch.int64 and nn.dtype == ref_nn.dtype
    assert torch.equal(idx[:32], torch.arange(32))              # no exclusion: its own entry


@pytest.mark.parametrize("topk", [1, 20])
def test_nnclr_find_nn_maect_head(topk):
    z, queue, queue_id, ids = queue_case()
    torch.manual_seed(11)
    ref_idx, ref_nn = maect_head_find_nn(z, queue, queue_id, ids, 0 if topk == 1 else topk)
    torch.manual_seed(11)                  # generator=None: the global CPU generator, the same draws
    idx, nn = nnclr_find_nn(z, queue, queue_id, ids, topk=topk)
    exact = (z.double() @ queue.double().T).masked_fill(queue_id[None, :] == ids[:, None], -1.0)
    agree_or_near_tie(exact, idx, ref_idx, fp32_tol(32, normalize=False), position=topk > 1)
    assert torch.equal(nn, queue[idx])
    assert not bool((queue_id[idx] == ids).any())
    if topk > 1:                           # an explicit generator: the same positions as the reference's draws
        a = nnclr_find_nn(z, queue, queue_id, ids, topk=topk, generator=torch.Generator().manual_seed(3))[0]
        b = nnclr_find_nn(z, queue, queue_id, ids, topk=topk, generator=torch.Generator().manual_seed(3))[0]
        assert torch.equal(a, b) and not torch.equal(a, idx)


def test_nnclr_find_nn_ties_dtypes_errors():
    z, queue, queue_id, ids = queue_case(B=8, Q=64, D=8)
    queue[40] = queue[10]                  # an exact duplicate of row 10: row 10 wins
    z[0] = queue[10]
    assert int(nnclr_find_nn(z, queue)[0][0]) == 10
    idx, nn = nnclr_find_nn(z.bfloat16(), queue)                  # mixed dtypes: searched in fp32, fp32 rows back
    assert nn.dtype == torch.float32 and torch.equal(idx, nnclr_find_nn(z.bfloat16().float(), queue)[0])
    with pytest.raises(ValueError, match="topk"):
        nnclr_find_nn(z, queue, topk=0)
    with pytest.raises(ValueError, match="both"):
        nnclr_find_nn(z, queue, queue_id, None)
    with pytest.raises(ValueError, match="Q >= topk=65"):
        nnclr_find_nn(z, queue, topk=65)
    with pytest.raises(ValueError, match="float tensor"):
        nnclr_find_nn(z.long(), queue)


def same(a, b):
    """Bitwise equal, NaN equal to NaN (a picked NaN row)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_non_finite_rows_pick_what_the_replaced_code_picks():
    """A NaN row in z: solo-learn's max, MAE-CT's max / topk and lightly's argmax return index 0 (their all-NaN
    similarity row); a NaN or inf row in the queue / bank: every row gets the first NaN entry, as their max /
    argmax; a row whose entries are all its own id: MAE-CT's -1 similarities, its pick. The adapters return the
    same, and agree with each other on normalised inputs."""
    z, queue, queue_id, ids = queue_case(B=16, Q=256, D=16)
    z[3] = float("nan")
    z[5, 2] = float("inf")
    bad, fine = [3, 5], [r for r in range(16) if r not in (3, 5)]
    exact = z.double() @ queue.double().T
    got, want = nnclr_find_nn(z, queue)[0], solo_find_nn(z, queue)[0]
    assert got[bad].tolist() == want[bad].tolist() == [0, 0]      # the rows with a NaN / inf: exactly
    agree_or_near_tie(exact[fine], got[fine], want[fine], fp32_tol(16, normalize=False))   # the others: the rule
    bank_idx = ml.nearest_index(z, queue)
    assert bank_idx[bad].tolist() == lightly_lines(z, queue)[bad].tolist() == [0, 0]
    agree_or_near_tie(exact[fine], bank_idx[fine], got[fine], fp32_tol(16))
    for topk in (1, 20):
        torch.manual_seed(4)
        want = maect_head_find_nn(z, queue, queue_id, ids, 0 if topk == 1 else topk)
        torch.manual_seed(4)
        got = nnclr_find_nn(z, queue, queue_id, ids, topk=topk)
        assert torch.equal(got[0][bad], want[0][bad]) and same(got[1][bad], want[1][bad])
        ex = exact.masked_fill(queue_id[None, :] == ids[:, None], -1.0)
        agree_or_near_tie(ex[fine], got[0][fine], want[0][fine], fp32_tol(16, normalize=False), position=topk > 1)
    q2 = queue.clone()
    q2[40] = float("nan")
    q2[7, 0] = float("inf")
    for zz in (z, F.normalize(torch.randn(16, 16), dim=1)):
        got, want = nnclr_find_nn(zz, q2), solo_find_nn(zz, q2)
        assert torch.equal(got[0], want[0]) and same(got[1], want[1])
        assert torch.equal(ml.nearest_index(zz, q2), lightly_lines(zz, q2))
    ref, ours = pair(256, 16, seed=5)
    for m in (ref, ours):
        m.bank[9] = float("nan")
    x = torch.randn(8, 16)
    x[2] = float("nan")
    assert same(ref(x), ours(x)) and same(ours(x)[0], ref.bank[9])
    own = torch.full((256,), 7)                                      # every entry is the query's own sample
    own[200:] = torch.arange(56) + 1000
    zz, ii = F.normalize(torch.randn(4, 16), dim=1), torch.full((4,), 7)
    torch.manual_seed(5)
    want = maect_head_find_nn(zz, queue, own, ii, 64)                # 56 admissible: 8 more from its own
    torch.manual_seed(5)
    assert torch.equal(nnclr_find_nn(zz, queue, own, ii, topk=64)[0], want[0])


def lightly_lines(x, bank):
    return (F.normalize(x, dim=1) @ F.normalize(bank, dim=1).t()).argmax(dim=1)


def test_fp64_is_searched_as_the_replaced_code_does():
    """fp64 z and queue / output and bank, which solo-learn, MAE-CT and lightly accept: the adapters run their lines
    in fp64 and return the same indices and rows (fp64)."""
    z, queue, queue_id, ids = queue_case(B=16, Q=256, D=16)
    z, queue = z.double(), queue.double()
    got, want = nnclr_find_nn(z, queue), solo_find_nn(z, queue)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1].dtype == torch.float64
    torch.manual_seed(6)
    want = maect_head_find_nn(z, queue, queue_id, ids, 20)
    torch.manual_seed(6)
    assert torch.equal(nnclr_find_nn(z, queue, queue_id, ids, topk=20)[0], want[0])
    assert torch.equal(nnclr_find_nn(z.float(), queue)[0], solo_find_nn(z.float().double(), queue)[0])
    ref, ours = pair(512, 16, seed=7)
    ref, ours = ref.double(), ours.double()
    x = torch.randn(32, 16, dtype=torch.float64)
    out = ours(x, update=True)
    assert out.dtype == torch.float64 and torch.equal(out, ref(x, update=True))
    assert torch.equal(ours.bank, ref.bank)


# ---- MAE random_masking: MAE's published algorithm ------------------------------------------------------------

def mae_reference(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,L,D,ratio", [(4, 196, 32, 0.75), (3, 49, 16, 0.5), (2, 10, 8, 0.0), (2, 10, 8, 1.0)])
def test_mae_random_masking_equals_reference(dtype, N, L, D, ratio):
    g = torch.Generator().manual_seed(L + D)
    x, noise = torch.randn(N, L, D, generator=g).to(dtype), torch.rand(N, L, generator=g)
    got, want = mae.random_masking(x, ratio, noise), mae_reference(x, ratio, noise)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


class TinyMAEEncoder(torch.nn.Module):
    """The part of models_mae.MaskedAutoencoderViT that calls random_masking, in MAE's structure."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)

    def random_masking(self, x, mask_ratio):
        return mae_reference(x, mask_ratio, torch.rand(x.shape[0], x.shape[1], device=x.device))

    def forward_encoder(self, x, mask_ratio):
        x, mask, ids_restore = self.random_masking(self.embed(x), mask_ratio)
        return x.sum(), mask, ids_restore


def test_mae_patch_random_masking():
    model = TinyMAEEncoder()
    x = torch.randn(3, 16, 8)
    torch.manual_seed(12)
    want = model.forward_encoder(x, 0.75)
    assert mae.patch_random_masking(model) is model
    torch.manual_seed(12)                  # the same global draw as MAE's torch.rand
    got = model.forward_encoder(x, 0.75)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got[0].backward()
    assert model.embed.weight.grad is not None and bool(model.embed.weight.grad.abs().sum() > 0)
    del model.random_masking               # restores the class's method
    assert model.random_masking.__func__ is TinyMAEEncoder.random_masking
    with pytest.raises(TypeError, match="random_masking"):
        mae.patch_random_masking(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("order", ["maect first", "lightly first"])
def test_grouped_import_trap_warns(tmp_path, order):
    """maect's NNMemoryBankModule imported above lightly's grouped import of the same name: the script runs
    lightly's class, silently before; now a UserWarning names the file and line. The other order is quiet."""
    ours = "from maect.integrations.lightly import NNMemoryBankModule\n"
    theirs = "from lightly.models.modules import NNCLRProjectionHead, NNMemoryBankModule, NNCLRPredictionHead\n"
    script = tmp_path / "train_nnclr.py"
    script.write_text((ours + theirs if order == "maect first" else theirs + ours) +
                      "print(NNMemoryBankModule.__module__)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    if order == "maect first":
        assert r.stdout.strip() == "lightly.models.modules.nn_memory_bank"
        assert f"{script}:2: UserWarning: line 2 rebinds NNMemoryBankModule imported from " \
               "maect.integrations.lightly at line 1" in r.stderr
    else:
        assert r.stdout.strip() == "maect.integrations.lightly" and "UserWarning" not in r.stderr


def test_patched_model_pickles():
    """torch.save of a patched model (the whole module, as MAE's checkpoints of the model object would) and
    torch.load give a model that still runs maect's random_masking, with the same draws as before the save."""
    import io
    model = mae.patch_random_masking(TinyMAEEncoder())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.random_masking is mae.random_masking
    x = torch.randn(3, 16, 8)
    torch.manual_seed(13)
    want = model.forward_encoder(x, 0.75)
    torch.manual_seed(13)
    got = loaded.forward_encoder(x, 0.75)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    del loaded.random_masking
    assert loaded.random_masking.__func__ is TinyMAEEncoder.random_masking


def test_swap_in_bench_quick():
    r = subprocess.run([sys.executable, "bench/swap_in.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "correctness: ok" in r.stdout and "lightly NNMemoryBankModule" in r.stdout


def mae_decoder_lines(x, mask_token, ids_restore, decoder_pos_embed):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return torch.cat([x[:, :1, :], x_], dim=1) + decoder_pos_embed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_decoder_lines_equal_kernels_decoder_input(dtype):
    """docs/swap-in.md's optional decoder edit: maect.kernels.decoder_input for forward_decoder's five lines."""
    from maect import kernels
    g = torch.Generator().manual_seed(13)
    N, L, D, keep = 3, 49, 16, 12
    x = torch.randn(N, 1 + keep, D, generator=g).to(dtype)
    mask_token, pos = torch.randn(1, 1, D, generator=g), torch.randn(1, 1 + L, D, generator=g)
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, generator=g), dim=1), dim=1)
    want = mae_decoder_lines(x, mask_token, ids_restore, pos)
    got = kernels.decoder_input(x, mask_token, ids_restore, pos)
    assert got.dtype == want.dtype and torch.equal(got, want)
