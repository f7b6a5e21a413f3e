// Registers the maect CPU ops. Bodies live in queue_topk.cpp and masking.cpp; fake (meta) kernels and autograd
// formulas are registered from Python in each op's file, kernels/ops/<op>.py (torch.library.register_fake / register_autograd).
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace maect {
std::tuple<at::Tensor, at::Tensor> queue_topk_cpu(const at::Tensor& query, const at::Tensor& queue, int64_t k,
                                                  const std::optional<at::Tensor>& exclude_ids,
                                                  const std::optional<at::Tensor>& queue_ids, bool normalized);
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x, const at::Tensor& noise,
                                                                   int64_t len_keep);
at::Tensor unshuffle_cpu(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore);
std::tuple<at::Tensor, at::Tensor> unshuffle_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                          int64_t len_keep);
at::Tensor decoder_input_cpu(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                             const std::optional<at::Tensor>& pos_embed, bool has_cls);
std::tuple<at::Tensor, at::Tensor> decoder_input_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                              int64_t len_keep, bool has_cls);
}  // namespace maect

TORCH_LIBRARY(maect, m) {
  m.def("queue_topk(Tensor query, Tensor queue, int k, Tensor? exclude_ids, Tensor? queue_ids, bool normalized)"
        " -> (Tensor values, Tensor indices)");
  m.def("random_masking(Tensor x, Tensor noise, int len_keep) -> (Tensor x_visible, Tensor mask, Tensor ids_restore)");
  m.def("unshuffle(Tensor x, Tensor mask_token, Tensor ids_restore) -> Tensor");
  m.def("unshuffle_backward(Tensor grad_out, Tensor ids_restore, int len_keep)"
        " -> (Tensor grad_x, Tensor grad_mask_token)");
  m.def("decoder_input(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, bool has_cls) -> Tensor");
  m.def("decoder_input_backward(Tensor grad_out, Tensor ids_restore, int len_keep, bool has_cls)"
        " -> (Tensor grad_x, Tensor grad_mask_token)");
}

TORCH_LIBRARY_IMPL(maect, CPU, m) {
  m.impl("queue_topk", &maect::queue_topk_cpu);
  m.impl("random_masking", &maect::random_masking_cpu);
  m.impl("unshuffle", &maect::unshuffle_cpu);
  m.impl("unshuffle_backward", &maect::unshuffle_backward_cpu);
  m.impl("decoder_input", &maect::decoder_input_cpu);
  m.impl("decoder_input_backward", &maect::decoder_input_backward_cpu);
}

// An importable (empty) Python module, so setup.py's ahead-of-time build `kernels._maect_C` can be imported; the
// ops register with the dispatcher when the library is loaded. TORCH_EXTENSION_NAME is set by both build paths.
#define MAECT_CONCAT_(a, b) a##b
#define MAECT_CONCAT(a, b) MAECT_CONCAT_(a, b)
#define MAECT_STR_(a) #a
#define MAECT_STR(a) MAECT_STR_(a)
PyMODINIT_FUNC MAECT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {  // PyMODINIT_FUNC is extern "C"
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, MAECT_STR(TORCH_EXTENSION_NAME),
                                   "maect CPU ops (torch.ops.maect.*)", -1, nullptr};
  return PyModule_Create(&def);
}
