// queue_topk on CPU: blocked GEMM + in-place per-row top-k, never materialising the [B, Q] similarity matrix.
//
// Contract: kernels/ops/queue_topk.py (the reference is the specification).
//   query [B, D], queue [Q, D] (fp32 / bf16 / fp16, same dtype, any strides)
//   -> values [B, k] fp32 (descending), indices [B, k] int64; ties -> lower queue index first; excluded entries and
//      non-finite similarities (NaN, +inf, -inf) never returned; rows with fewer than k admissible entries padded
//      with (-inf, -1).
//
// Work split: the B query rows are cut into row tiles of R <= kRowTile rows and, only when there are fewer tiles
// than threads (small B), the queue into nq chunks whose per-row results are merged at the end. The (tile, chunk)
// work items are handed out dynamically (an atomic counter), so a thread slowed by a busy core takes fewer items.
// Inside an item:
//   for each queue block of kQueueBlock rows (fp32 view of the queue, or a converted copy for bf16/fp16/strided):
//     C[tile, block] = q_tile @ e_block^T          (single-threaded ATen GEMM: nested parallel regions run inline)
//     scan C row by row against the row's current k-th value (8 floats per AVX2 compare); the few survivors are
//     pushed into the row's bounded heap of size k.
// Extra memory: C (kRowTile x kQueueBlock fp32) and an fp32 block copy per thread, the heaps (nq x B x k),
// an fp32 copy of the query when it is not fp32-contiguous or normalized=False, and [Q] inverse norms when
// normalized=False. Never O(B * Q).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace maect {
namespace {

// Block sizes: at B=2048, Q=65536, D=256 the op costs ~1.05x the CPU time of the bare blocked GEMMs [B, D] x [D, 512]
// (measured on one Zen 4 core; the top-k adds ~3%); row tiles 256..1024 and queue blocks 256..1024 were within 4%.
// 512-row tiles still give 2 work items per thread at B=2048 on 2 threads, for the dynamic balance.
constexpr int64_t kQueueBlock = 512;  // queue rows per GEMM block (512 x D fp32 = 512 KiB at D=256)
constexpr int64_t kRowTile = 512;     // max query rows per GEMM / work item: C tile of 512 x 512 fp32 = 1 MiB
constexpr int64_t kMinRowTile = 64;   // below this the GEMM gets inefficient -> split the queue instead

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Heap order: the root is the *worst* kept entry. An entry is worse when its value is smaller, or equal with a
// larger queue index (the tie rule: lower index ranks first).
inline bool worse(float va, int64_t ia, float vb, int64_t ib) {
  return va < vb || (va == vb && ia > ib);
}

// Replace the root (the worst entry) by (nv, ni) and sift it down. v, ix: the row's k-entry heap.
inline void heap_replace_top(float* v, int64_t* ix, int64_t k, float nv, int64_t ni) {
  int64_t pos = 0;
  while (true) {
    int64_t c = 2 * pos + 1;
    if (c >= k) break;
    if (c + 1 < k && worse(v[c + 1], ix[c + 1], v[c], ix[c])) ++c;
    if (!worse(v[c], ix[c], nv, ni)) break;
    v[pos] = v[c];
    ix[pos] = ix[c];
    pos = c;
  }
  v[pos] = nv;
  ix[pos] = ni;
}

// Offer one candidate (value s, queue index j) to a row's heap. Candidates arrive in ascending j, so a value equal
// to the root's never displaces it (the root has a lower index or is padding with -inf): strict `>` suffices.
// Returns the row's new threshold (the root value).
inline float offer(float* v, int64_t* ix, int64_t k, float s, int64_t j, const int64_t* queue_ids,
                   int64_t exclude_id) {
  if (queue_ids != nullptr && queue_ids[j] == exclude_id) return v[0];
  heap_replace_top(v, ix, k, s, j);
  return v[0];
}

// Scan one row of similarities c[0:n] (queue indices j0 + [0, n)), optionally scaled by inverse norms
// scale[0:n], against the row's heap. Only values strictly above the current k-th value are offered.
void select_row(const float* c, const float* scale, int64_t n, int64_t j0, float* v, int64_t* ix, int64_t k,
                const int64_t* queue_ids, int64_t exclude_id) {
  float thr = v[0];
  int64_t j = 0;
#ifdef __AVX2__
  __m256 thr8 = _mm256_set1_ps(thr);
  const __m256 inf8 = _mm256_set1_ps(kPosInf);
  alignas(32) float tmp[8];
  for (; j + 8 <= n; j += 8) {
    __m256 s8 = _mm256_loadu_ps(c + j);
    if (scale != nullptr) s8 = _mm256_mul_ps(s8, _mm256_loadu_ps(scale + j));
    // above the row's k-th value and finite (ordered compares: NaN is never above; +inf is not admissible)
    int m = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(s8, thr8, _CMP_GT_OQ), _mm256_cmp_ps(s8, inf8, _CMP_LT_OQ)));
    if (m == 0) continue;  // the common case once the heap has warmed up: one compare per 8 candidates
    _mm256_store_ps(tmp, s8);
    while (m != 0) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      if (tmp[b] > thr) thr = offer(v, ix, k, tmp[b], j0 + j + b, queue_ids, exclude_id);
    }
    thr8 = _mm256_set1_ps(thr);
  }
#endif
  for (; j < n; ++j) {
    const float s = scale != nullptr ? c[j] * scale[j] : c[j];
    if (s > thr && s < kPosInf) thr = offer(v, ix, k, s, j0 + j, queue_ids, exclude_id);
  }
}

// Inverse L2 norms 1 / max(||e_j||, 1e-12) of the queue rows, fp32 accumulation (F.normalize's eps rule).
at::Tensor inverse_row_norms(const at::Tensor& queue) {
  const int64_t Q = queue.size(0), D = queue.size(1);
  at::Tensor inv = at::empty({Q}, queue.options().dtype(at::kFloat));
  float* out = inv.data_ptr<float>();
  constexpr int64_t kRows = 256;  // rows converted to fp32 at a time: 256 x D per thread, never a copy of the queue
  at::parallel_for(0, Q, kRows, [&](int64_t begin, int64_t end) {
    at::Tensor rows;
    for (int64_t j = begin; j < end; ++j) {
      if ((j - begin) % kRows == 0) rows = queue.slice(0, j, std::min(j + kRows, end)).to(at::kFloat).contiguous();
      const float* x = rows.data_ptr<float>() + ((j - begin) % kRows) * D;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable, no reassociation
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int t = 0; t < 8; ++t) acc[t] += x[d + t] * x[d + t];
      for (; d < D; ++d) acc[0] += x[d] * x[d];
      const float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      out[j] = 1.0f / std::max(std::sqrt(ss), 1e-12f);
    }
  });
  return inv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> queue_topk_cpu(const at::Tensor& query, const at::Tensor& queue, int64_t k,
                                                  const std::optional<at::Tensor>& exclude_ids,
                                                  const std::optional<at::Tensor>& queue_ids, bool normalized) {
  TORCH_CHECK(query.dim() == 2 && queue.dim() == 2 && query.size(1) == queue.size(1),
              "queue_topk: query must be [B, D] and queue [Q, D]");
  TORCH_CHECK(query.scalar_type() == queue.scalar_type() && at::isFloatingType(query.scalar_type()),
              "queue_topk: query and queue must share a float dtype");
  TORCH_CHECK(exclude_ids.has_value() == queue_ids.has_value(),
              "queue_topk: pass both exclude_ids and queue_ids, or neither");
  const int64_t B = query.size(0), Q = queue.size(0), D = query.size(1);
  TORCH_CHECK(k >= 1 && k <= Q, "queue_topk: k=", k, " must satisfy 1 <= k <= Q=", Q);
  at::Tensor values = at::empty({B, k}, query.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, k}, query.options().dtype(at::kLong));
  if (B == 0) return {values, indices};

  // fp32 query rows; normalized=False uses the same ops as F.normalize so the query side matches bit for bit.
  at::Tensor qf = query.to(at::kFloat).contiguous();
  if (!normalized) qf = qf / at::linalg_vector_norm(qf, 2, {1}, true).clamp_min(1e-12);
  at::Tensor inv_norm = normalized ? at::Tensor() : inverse_row_norms(queue);
  const float* inv_ptr = normalized ? nullptr : inv_norm.data_ptr<float>();
  at::Tensor ex, qid;
  if (exclude_ids.has_value()) {
    ex = exclude_ids->to(at::kLong).contiguous();
    qid = queue_ids->to(at::kLong).contiguous();
    TORCH_CHECK(ex.numel() == B && qid.numel() == Q, "queue_topk: exclude_ids must be [B], queue_ids [Q]");
  }
  const int64_t* ex_ptr = ex.defined() ? ex.data_ptr<int64_t>() : nullptr;
  const int64_t* qid_ptr = qid.defined() ? qid.data_ptr<int64_t>() : nullptr;
  // The queue is used in place when it is fp32 with unit-stride rows; otherwise each block is copied to fp32.
  const bool direct = queue.scalar_type() == at::kFloat && queue.stride(1) == 1;
  const float* queue_ptr = direct ? queue.data_ptr<float>() : nullptr;
  const int64_t queue_ld = direct ? queue.stride(0) : D;

  // Work split (see the top of the file): row tiles of R rows; queue chunks only when tiles < threads.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_blocks = (Q + kQueueBlock - 1) / kQueueBlock;
  const int64_t R = std::clamp<int64_t>((B + threads - 1) / threads, kMinRowTile, kRowTile);
  const int64_t n_tiles = (B + R - 1) / R;
  const int64_t nq = std::clamp<int64_t>(threads / n_tiles, 1, n_blocks);
  const int64_t n_items = n_tiles * nq;
  // Heaps: [nq, B, k]; every entry starts as padding (-inf, -1), which any admissible finite value displaces.
  std::vector<float> heap_v(static_cast<size_t>(nq * B * k), kNegInf);
  std::vector<int64_t> heap_i(static_cast<size_t>(nq * B * k), -1);

  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    std::vector<float> cbuf(static_cast<size_t>(R * kQueueBlock));
    std::vector<float> ebuf(direct ? 0 : static_cast<size_t>(kQueueBlock * D));
    for (int64_t item = next_item++; item < n_items; item = next_item++) {
      const int64_t tile = item / nq, qc = item % nq;
      const int64_t r0 = tile * R, bt = std::min(R, B - r0);
      const int64_t b0 = n_blocks * qc / nq, b1 = n_blocks * (qc + 1) / nq;  // this chunk's queue blocks
      float* hv = heap_v.data() + (qc * B + r0) * k;
      int64_t* hi = heap_i.data() + (qc * B + r0) * k;
      const at::Tensor q_tile = qf.slice(0, r0, r0 + bt);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * kQueueBlock, qb = std::min(kQueueBlock, Q - j0);
        at::Tensor e_blk;
        if (direct) {
          e_blk = at::from_blob(const_cast<float*>(queue_ptr) + j0 * queue_ld, {qb, D}, {queue_ld, 1},
                                qf.options());
        } else {
          e_blk = at::from_blob(ebuf.data(), {qb, D}, qf.options());
          e_blk.copy_(queue.slice(0, j0, j0 + qb));  // dtype conversion / gather of strided rows
        }
        at::Tensor c = at::from_blob(cbuf.data(), {bt, qb}, qf.options());
        at::mm_out(c, q_tile, e_blk.t());
        const float* scale = inv_ptr != nullptr ? inv_ptr + j0 : nullptr;
        for (int64_t b = 0; b < bt; ++b)
          select_row(cbuf.data() + b * qb, scale, qb, j0, hv + b * k, hi + b * k, k, qid_ptr,
                     ex_ptr != nullptr ? ex_ptr[r0 + b] : 0);
      }
    }
  });

  // Merge the nq heaps of each row and write the k best in order (value desc, index asc); padding stays (-inf, -1).
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> cand(static_cast<size_t>(nq * k));
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return worse(b.first, b.second, a.first, a.second);
    };
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t qc = 0; qc < nq; ++qc)
        for (int64_t t = 0; t < k; ++t)
          cand[qc * k + t] = {heap_v[(qc * B + b) * k + t], heap_i[(qc * B + b) * k + t]};
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), better);
      for (int64_t t = 0; t < k; ++t) {
        out_v[b * k + t] = cand[t].first;
        out_i[b * k + t] = cand[t].first == kNegInf ? -1 : cand[t].second;
      }
    }
  });
  return {values, indices};
}

}  // namespace maect
