// MAE random masking and the decoder's unshuffle on CPU: one pass per sample, no intermediate tensors.
//
// Contract: kernels/ops/random_masking.py, unshuffle.py, decoder_input.py (the references are the specification).
//   random_masking(x [N, L, D], noise [N, L], len_keep K) -> (x_visible [N, K, D], mask [N, L] (x dtype, 1 = removed),
//                                                            ids_restore [N, L] int64)
//     ids_shuffle = stable argsort of noise per row (NaN sorts last, like torch.sort); x_visible[n, i] =
//     x[n, ids_shuffle[n, i]] for i < K; ids_restore = inverse permutation; mask[n, l] = ids_restore[n, l] >= K.
//   unshuffle(x [N, K, D], mask_token (D values), ids_restore [N, L] int64) -> out [N, L, D]
//     out[n, l] = x[n, ids_restore[n, l]] if ids_restore[n, l] < K else mask_token (cast to x's dtype).
//   unshuffle_backward(grad_out [N, L, D], ids_restore [N, L], K) -> (grad_x [N, K, D], grad_mask_token [D])
//     grad_x = scatter-add of the rows with ids_restore < K; grad_mask_token = sum of the others (fp32 accumulation,
//     rounded once to grad_out's dtype).
//   decoder_input(x [N, c+K, D], mask_token (D values), ids_restore [N, L], pos_embed ((c+L)*D values) or None,
//                 has_cls (c = 1 or 0)) -> out [N, c+L, D] in the promotion of the three dtypes:
//     out[n, 0] = x[n, 0] + pos[0] (cls); out[n, c+l] = (x[n, c+r] if r < K else mask_token) + pos[c+l], r =
//     ids_restore[n, l]; the add in opmath (float for half types) and rounded once: what torch's add gives.
//   decoder_input_backward(grad_out [N, c+L, D], ids_restore, K, has_cls) -> (grad_x [N, c+K, D], grad_mask_token
//     [D]), both in grad_out's dtype: unshuffle_backward with the cls row passed through.
// The backward of random_masking is unshuffle(grad_x_visible, zeros, ids_restore) (see kernels/ops/random_masking.py).
// All copies are exact; every op parallelises over samples (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace maect {
namespace {

// Copy one token of D elements between rows with element strides src_sd / dst_sd.
template <typename T>
inline void copy_token(T* dst, int64_t dst_sd, const T* src, int64_t src_sd, int64_t D) {
  if (dst_sd == 1 && src_sd == 1) {
    std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(T));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d * dst_sd] = src[d * src_sd];
  }
}

void check_ids(const at::Tensor& ids_restore, int64_t N) {
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == N, "maect: ids_restore must be [N, L]");
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong, "maect: ids_restore must be int64, got ",
              ids_restore.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x, const at::Tensor& noise,
                                                                   int64_t len_keep) {
  TORCH_CHECK(x.dim() == 3, "random_masking: x must be [N, L, D]");
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == N && noise.size(1) == L, "random_masking: noise must be [N, L]");
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "random_masking: len_keep=", len_keep, " outside [0, L=", L, "]");
  const int64_t K = len_keep;
  at::Tensor x_visible = at::empty({N, K, D}, x.options());
  at::Tensor mask = at::empty({N, L}, x.options());
  at::Tensor ids_restore = at::empty({N, L}, x.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {x_visible, mask, ids_restore};
  // Noise in double: exact for every float dtype, so the order equals the order in the input dtype.
  const at::Tensor nz = noise.to(at::kDouble).contiguous();
  const double* nz_ptr = nz.data_ptr<double>();
  int64_t* restore = ids_restore.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "random_masking_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = x_visible.data_ptr<scalar_t>();
    scalar_t* mp = mask.data_ptr<scalar_t>();
    const int64_t sn = x.stride(0), sl = x.stride(1), sd = x.stride(2);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(static_cast<size_t>(L));
      for (int64_t n = begin; n < end; ++n) {
        const double* r = nz_ptr + n * L;
        std::iota(order.begin(), order.end(), int64_t{0});
        // Stable ascending order with NaN last (torch.sort's convention); ties keep the lower position first.
        std::stable_sort(order.begin(), order.end(), [r](int64_t a, int64_t b) {
          const double va = r[a], vb = r[b];
          if (std::isnan(vb)) return !std::isnan(va);
          return va < vb;
        });
        int64_t* rs = restore + n * L;
        scalar_t* mrow = mp + n * L;
        for (int64_t i = 0; i < L; ++i) {
          const int64_t l = order[i];
          rs[l] = i;
          mrow[l] = static_cast<scalar_t>(i >= K ? 1 : 0);
          if (i < K) copy_token(vp + (n * K + i) * D, 1, xp + n * sn + l * sl, sd, D);
        }
      }
    });
  });
  return {x_visible, mask, ids_restore};
}

at::Tensor unshuffle_cpu(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore) {
  TORCH_CHECK(x.dim() == 3, "unshuffle: x must be [N, K, D]");
  const int64_t N = x.size(0), K = x.size(1), D = x.size(2);
  check_ids(ids_restore, N);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(L >= K, "unshuffle: ids_restore must have L >= K=", K, " columns, got ", L);
  TORCH_CHECK(mask_token.numel() == D, "unshuffle: mask_token must hold D=", D, " values");
  at::Tensor out = at::empty({N, L, D}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor token = mask_token.reshape({D}).to(x.scalar_type()).contiguous();
  const at::Tensor ids = ids_restore.contiguous();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "unshuffle_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = token.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sn = x.stride(0), sk = x.stride(1), sd = x.stride(2);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = ip[n * L + l];
          TORCH_CHECK(i >= 0 && i < L, "unshuffle: ids_restore value ", i, " outside [0, L=", L, ")");
          scalar_t* dst = op + (n * L + l) * D;
          if (i < K) copy_token(dst, 1, xp + n * sn + i * sk, sd, D);
          else copy_token(dst, 1, tp, 1, D);
        }
      }
    });
  });
  return out;
}

namespace {

// grad_x [N, c+K, D]: the cls row (c = 1) and the kept rows scattered back (added: a repeated index accumulates, as
// the reference's gather backward does); grad_mask_token [D]: the sum of the masked rows (opmath accumulation, one
// partial sum per sample reduced at the end, rounded once to grad_out's dtype).
std::tuple<at::Tensor, at::Tensor> scatter_backward(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                    int64_t len_keep, int64_t c, const char* op) {
  TORCH_CHECK(grad_out.dim() == 3, op, ": grad_out must be [N, c+L, D]");
  const int64_t N = grad_out.size(0), T = grad_out.size(1), D = grad_out.size(2), K = len_keep;
  check_ids(ids_restore, N);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(T == c + L && K >= 0 && K <= L, op, ": shapes disagree (grad_out ", grad_out.sizes(), ", ids_restore ",
              ids_restore.sizes(), ", len_keep ", K, ")");
  at::Tensor grad_x = at::zeros({N, c + K, D}, grad_out.options());
  const auto acc_type = at::toOpMathType(grad_out.scalar_type());
  at::Tensor partial = at::zeros({N, D}, grad_out.options().dtype(acc_type));
  const at::Tensor ids = ids_restore.contiguous();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "scatter_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    acc_t* pp = partial.data_ptr<acc_t>();
    const int64_t sn = grad_out.stride(0), sl = grad_out.stride(1), sd = grad_out.stride(2);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t* acc = pp + n * D;
        if (c) copy_token(xp + n * (c + K) * D, 1, gp + n * sn, sd, D);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = ip[n * L + l];
          TORCH_CHECK(i >= 0 && i < L, op, ": ids_restore value ", i, " outside [0, L=", L, ")");
          const scalar_t* g = gp + n * sn + (c + l) * sl;
          if (i < K) {
            scalar_t* dst = xp + (n * (c + K) + c + i) * D;  // a plain copy when ids_restore is a permutation
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(dst[d] + g[d * sd]);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(g[d * sd]);
          }
        }
      }
    });
  });
  at::Tensor grad_token = partial.sum(0).to(grad_out.scalar_type());
  return {grad_x, grad_token};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> unshuffle_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                          int64_t len_keep) {
  return scatter_backward(grad_out, ids_restore, len_keep, 0, "unshuffle_backward");
}

std::tuple<at::Tensor, at::Tensor> decoder_input_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                              int64_t len_keep, bool has_cls) {
  return scatter_backward(grad_out, ids_restore, len_keep, has_cls ? 1 : 0, "decoder_input_backward");
}

at::Tensor decoder_input_cpu(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                             const std::optional<at::Tensor>& pos_embed, bool has_cls) {
  TORCH_CHECK(x.dim() == 3, "decoder_input: x must be [N, c+K, D]");
  const int64_t c = has_cls ? 1 : 0;
  const int64_t N = x.size(0), K = x.size(1) - c, D = x.size(2);
  check_ids(ids_restore, N);
  const int64_t L = ids_restore.size(1), T = c + L;
  TORCH_CHECK(K >= 0 && K <= L, "decoder_input: x has ", x.size(1), " rows; with has_cls=", has_cls,
              " that must be in [", c, ", ", T, "]");
  TORCH_CHECK(mask_token.numel() == D, "decoder_input: mask_token must hold D=", D, " values");
  at::ScalarType ot = at::promote_types(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->numel() == T * D, "decoder_input: pos_embed must hold (c+L)*D=", T * D, " values");
    ot = at::promote_types(ot, pos_embed->scalar_type());
  }
  at::Tensor out = at::empty({N, T, D}, x.options().dtype(ot));
  if (out.numel() == 0) return out;
  const at::Tensor xs = x.to(ot);  // x itself unless it is narrower (CPU autocast): the promotion is exact
  const at::Tensor token = mask_token.reshape({D}).to(ot).contiguous();
  const at::Tensor pos = pos_embed.has_value() ? pos_embed->reshape({T, D}).to(ot).contiguous() : at::Tensor();
  const at::Tensor ids = ids_restore.contiguous();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ot, "decoder_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const scalar_t* tp = token.const_data_ptr<scalar_t>();
    const scalar_t* pp = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sn = xs.stride(0), sk = xs.stride(1), sd = xs.stride(2);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* src = xp + n * sn;  // the cls row
          int64_t s = sd;
          if (t >= c) {
            const int64_t i = ip[n * L + t - c];
            TORCH_CHECK(i >= 0 && i < L, "decoder_input: ids_restore value ", i, " outside [0, L=", L, ")");
            if (i < K) src = xp + n * sn + (c + i) * sk;
            else { src = tp; s = 1; }
          }
          scalar_t* dst = op + (n * T + t) * D;
          if (pp == nullptr) {
            copy_token(dst, 1, src, s, D);
          } else {
            const scalar_t* pr = pp + t * D;
            for (int64_t d = 0; d < D; ++d)
              dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d * s]) + static_cast<acc_t>(pr[d]));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace maect
