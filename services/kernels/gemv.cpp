// y[b, :] = W x[b, :] (+ bias) for a few rows b: fp32, AVX2 + FMA, weight rows streamed once.
// Decode is bound by reading the weights; ATen's fp32 GEMM path for one or a few rows reads them
// at about a third of this machine's bandwidth. Each thread reads its share of W front to back (dot.h).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "dot.h"

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x [B, in], weight [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "gemv: fp32 only");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1), out = wc.size(0);
  auto y = torch::empty({rows, out}, xc.options());
  const float* W = wc.data_ptr<float>();
  const float* X = xc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    boomerang::matvec_rows(W, begin, end, in, X, rows, Y + begin, out);
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv, "few-row fp32 GEMV (AVX2/FMA)"); }
