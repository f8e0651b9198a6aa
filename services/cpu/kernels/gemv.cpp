// y[b, :] = W x[b, :] (+ bias) for a few rows b: fp32, AVX2 + FMA, weight rows streamed once.
// Decode is bound by reading the weights; ATen's fp32 GEMM path for one or a few rows reads them
// at about a third of this machine's bandwidth. Each thread reads its share of W front to back (dot.h).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "dot.h"

// y [rows, out] = x [rows, in] W^T (+ bias) for a weight matrix of either form, its rows shared among threads.
torch::Tensor apply(const torch::Tensor& x, int64_t out, const boomerang::Weights& w,
                    const c10::optional<torch::Tensor>& bias) {
  const int64_t rows = x.size(0), in = x.size(1);
  auto y = torch::empty({rows, out}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    boomerang::matvec_rows(w, begin, end, in, X, rows, Y + begin, out);
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x [B, in], weight [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "gemv: fp32 only");
  const auto wc = weight.contiguous();
  return apply(x.contiguous(), wc.size(0), {wc.data_ptr<float>(), nullptr, nullptr}, bias);
}

// The same over int8 weights with one fp32 scale per row (weight = q8 * scale), fp32 input and output.
torch::Tensor gemv_q8(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                      const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv_q8: x [B, in], weight [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kChar &&
              scale.scalar_type() == torch::kFloat && scale.numel() == weight.size(0),
              "gemv_q8: fp32 x, int8 weight, one fp32 scale per weight row");
  const auto wc = weight.contiguous(), sc = scale.contiguous();
  return apply(x.contiguous(), wc.size(0), {nullptr, wc.data_ptr<int8_t>(), sc.data_ptr<float>()}, bias);
}

// The same over 4-bit weights: weight uint8 [out, in / 2] (blocks of 32 packed in pairs), scale and minimum
// fp16 [out, in / 32]; fp32 input and output, in a multiple of 64.
torch::Tensor gemv_q4(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                      const torch::Tensor& minimum, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == 2 * weight.size(1) && x.size(1) % 64 == 0,
              "gemv_q4: x [B, in], weight [out, in / 2], in a multiple of 64");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kByte &&
                  scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf &&
                  scale.numel() == weight.size(0) * x.size(1) / 32 && minimum.numel() == scale.numel(),
              "gemv_q4: fp32 x, uint8 weight, one fp16 scale and minimum per block of 32");
  const auto wc = weight.contiguous(), sc = scale.contiguous(), mc = minimum.contiguous();
  boomerang::Weights w;
  w.q4 = wc.data_ptr<uint8_t>();
  w.block_scale = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  w.block_min = reinterpret_cast<const uint16_t*>(mc.data_ptr<at::Half>());
  return apply(x.contiguous(), wc.size(0), w, bias);
}

// Sum of a contiguous fp32 tensor, each thread streaming its share with the GEMV's read loop: a second
// probe of the machine's read bandwidth for `boomerang bench`, beside torch's own sum.
double stream_sum(const torch::Tensor& data) {
  TORCH_CHECK(data.scalar_type() == torch::kFloat && data.is_contiguous(), "stream_sum: contiguous fp32");
  const float* p = data.data_ptr<float>();
  const int64_t n = data.numel();
  double total = 0;
#pragma omp parallel num_threads(at::get_num_threads()) reduction(+ : total)
  {
    const int part = omp_get_thread_num(), parts = omp_get_num_threads();
    const int64_t begin = n * part / parts, end = n * (part + 1) / parts;
    total += boomerang::stream_sum(p + begin, end - begin);
  }
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "few-row fp32 GEMV (AVX2/FMA)");
  m.def("gemv_q8", &gemv_q8, "few-row GEMV over int8 weights with per-row scales (AVX2/FMA)");
  m.def("gemv_q4", &gemv_q4, "few-row GEMV over 4-bit weights in blocks of 32 (AVX2, VNNI where present)");
  m.def("stream_sum", &stream_sum, "sum of an fp32 tensor read like GEMV weights (a bandwidth probe)");
}
