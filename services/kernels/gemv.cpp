// y[b, :] = W x[b, :] (+ bias) for a few rows b: fp32, AVX2 + FMA, weight rows streamed once.
// Decode is bound by reading the weights; ATen's fp32 GEMM path for one or a few rows reads them
// at about half this machine's bandwidth. Eight weight rows at a time share each load of x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kRows = 8;  // weight rows per group: 8 accumulators + x fit the 16 AVX2 registers

inline float horizontal_sum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
  low = _mm_add_ps(low, high);
  __m128 shuffled = _mm_movehdup_ps(low);
  __m128 sums = _mm_add_ps(low, shuffled);
  shuffled = _mm_movehl_ps(shuffled, sums);
  return _mm_cvtss_f32(_mm_add_ss(sums, shuffled));
}

float tail_dot(const float* w, const float* x, int64_t count) {
  float sum = 0;
  for (int64_t i = 0; i < count; ++i) sum += w[i] * x[i];
  return sum;
}

// Rows [first, first + Count) of W against one input row x (Count fixed so the loop unrolls). Out of line,
// with the tail (in % 8) added after the reduction: otherwise GCC kept the accumulators on the stack.
template <int Count>
__attribute__((noinline)) void dot_rows(const float* W, const float* x, int64_t in, int64_t first, float* y) {
  const int64_t full = in - in % 8;
  __m256 acc[Count];
  for (int r = 0; r < Count; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < full; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < Count; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(W + (first + r) * in + i), xv, acc[r]);
  }
  for (int r = 0; r < Count; ++r) y[first + r] = horizontal_sum(acc[r]);
  if (full != in)
    for (int r = 0; r < Count; ++r) y[first + r] += tail_dot(W + (first + r) * in + full, x + full, in - full);
}

}  // namespace

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x [B, in], weight [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "gemv: fp32 only");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1), out = wc.size(0);
  auto y = torch::empty({rows, out}, xc.options());
  const float* W = wc.data_ptr<float>();
  const float* X = xc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t groups = (out + kRows - 1) / kRows;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kRows;
      for (int64_t b = 0; b < rows; ++b) {
        if (first + kRows <= out) {
          dot_rows<kRows>(W, X + b * in, in, first, Y + b * out);
        } else {
          for (int64_t r = first; r < out; ++r) dot_rows<1>(W, X + b * in, in, r, Y + b * out);
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv, "few-row fp32 GEMV (AVX2/FMA)"); }
