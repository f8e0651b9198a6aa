// GPTQ's inner column loop (services/family/gptq.py): each column rounded to its rows' grid, its error pushed
// onto the columns after it; for 4-bit blocks, each block's scale and minimum fitted when the loop reaches it.
// Rows never interact, so each thread takes a share of the rows through every column with no barrier; in
// Python the loop costs several tensor calls per column.
// Plain multiplies and adds, as torch computes the same rounding: a fused one would round some ties the other way.
#pragma GCC optimize("fp-contract=off")
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <initializer_list>

namespace {

constexpr int64_t kBlock = 32;   // services/family/q4_blocks.py BLOCK
constexpr float kQ4Max = 15.0f;  // Q4_MAX
// Rows taken through a group's columns at a time: a group of their weights stays in L1 while each column's
// error is pushed onto the columns after it.
constexpr int64_t kRowChunk = 32;

void check_fp32(std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "gptq_loop: contiguous fp32 tensors");
  }
}

// Columns [start, stop) of w [n, rows] for rows [first, last): level = clamp(floor((w - m) * inv + 0.5), lo, hi)
// into q [stop - start, rows], error over the pivot into e, pushed onto columns up to update_end. The grid
// arrays s, m, inv are indexed by r - first.
void round_range(float* w, const float* f, int64_t n, int64_t rows, int64_t start, int64_t stop, int64_t update_end,
                 const float* s, const float* m, const float* inv, float lo, float hi, float* q, float* e,
                 int64_t first, int64_t last) {
  for (int64_t c = start; c < stop; ++c) {
    const float* wc = w + c * rows;
    float* qc = q + (c - start) * rows;
    float* ec = e + (c - start) * rows;
    const float pivot = f[c * n + c];
    for (int64_t r = first; r < last; ++r) {
      const int64_t g = r - first;
      const float level = std::min(std::max(std::floor((wc[r] - m[g]) * inv[g] + 0.5f), lo), hi);
      qc[r] = level;
      ec[r] = (wc[r] - (level * s[g] + m[g])) / pivot;
    }
    for (int64_t j = c + 1; j < update_end; ++j) {
      const float fj = f[c * n + j];
      float* wj = w + j * rows;
      for (int64_t r = first; r < last; ++r) wj[r] -= fj * ec[r];
    }
  }
}

float as_half(float v) { return static_cast<float>(c10::Half(v)); }

float sum8(__m256 v) {
  const __m128 folded = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

__m256 clamp_levels(__m256 level) {
  return _mm256_min_ps(_mm256_max_ps(level, _mm256_setzero_ps()), _mm256_set1_ps(kQ4Max));
}

// Weighted squared error of block x [32] rounded to (scale, minimum), both first rounded to fp16 as stored.
float block_error(const float* x, const float* weight, float& scale, float& minimum) {
  scale = as_half(scale);
  minimum = as_half(minimum);
  const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum), half = _mm256_set1_ps(0.5f);
  const __m256 inverse = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
  __m256 error = _mm256_setzero_ps();
  for (int64_t i = 0; i < kBlock; i += 8) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    const __m256 level = clamp_levels(_mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(xi, m), inverse), half)));
    const __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(level, s), m), xi);
    error = _mm256_add_ps(error, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(d, d)));
  }
  return sum8(error);
}

// services/family/q4_blocks.py fit_blocks for one block: its range, unless a weighted least-squares fit over
// the levels of a nearby scale (one per step) errs less; the first of equals wins.
void fit_block(const float* x, const float* weight, const float* steps, int64_t num_steps, float& scale,
               float& minimum) {
  float low = x[0], high = x[0], total = 0, sum_x = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
    total += weight[i];
    sum_x += weight[i] * x[i];
  }
  const float span = std::max(high - low, FLT_MIN);
  scale = span / kQ4Max;
  minimum = low;
  float best = block_error(x, weight, scale, minimum);
  const __m256 low8 = _mm256_set1_ps(low);
  for (int64_t k = 0; k < num_steps; ++k) {
    const __m256 multiplier = _mm256_set1_ps((kQ4Max + steps[k]) / span);
    __m256 sum_l = _mm256_setzero_ps(), sum_ll = _mm256_setzero_ps(), sum_lx = _mm256_setzero_ps();
    for (int64_t i = 0; i < kBlock; i += 8) {
      const __m256 xi = _mm256_loadu_ps(x + i);
      const __m256 level = clamp_levels(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(xi, low8), multiplier),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256 weighted = _mm256_mul_ps(_mm256_loadu_ps(weight + i), level);
      sum_l = _mm256_add_ps(sum_l, weighted);
      sum_ll = _mm256_add_ps(sum_ll, _mm256_mul_ps(weighted, level));
      sum_lx = _mm256_add_ps(sum_lx, _mm256_mul_ps(weighted, xi));
    }
    const float l = sum8(sum_l), ll = sum8(sum_ll), lx = sum8(sum_lx);
    const float determinant = total * ll - l * l;
    float s = span / kQ4Max, m = low;
    if (determinant > 0) {
      s = (total * lx - l * sum_x) / determinant;
      m = (ll * sum_x - l * lx) / determinant;
    }
    const float error = block_error(x, weight, s, m);
    if (error < best) {
      best = error;
      scale = s;
      minimum = m;
    }
  }
}

}  // namespace

// columns [n, rows]: the weights as the earlier columns' errors left them, updated in place up to `update_end`.
// For each column c in [start, stop): level = clamp(floor((w - minimum) * inverse + 0.5), low, high) into
// levels [stop - start, rows], error = (w - (level * scale + minimum)) / factor[c, c] into errors
// [stop - start, rows], and columns[c + 1 : update_end] -= factor[c, c + 1 : update_end] x error.
void round_columns(torch::Tensor columns, const torch::Tensor& factor, int64_t start, int64_t stop,
                   int64_t update_end, const torch::Tensor& scale, const torch::Tensor& minimum,
                   const torch::Tensor& inverse, double low, double high, torch::Tensor levels, torch::Tensor errors) {
  const int64_t n = columns.size(0), rows = columns.size(1);
  check_fp32({&columns, &factor, &scale, &minimum, &inverse, &levels, &errors});
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == n && factor.size(1) == n, "round_columns: factor [n, n]");
  TORCH_CHECK(0 <= start && start <= stop && stop <= update_end && update_end <= n, "round_columns: column range");
  TORCH_CHECK(scale.numel() == rows && minimum.numel() == rows && inverse.numel() == rows, "round_columns: [rows]");
  TORCH_CHECK(levels.numel() == (stop - start) * rows && errors.numel() == (stop - start) * rows,
              "round_columns: levels and errors [stop - start, rows]");
  float* w = columns.data_ptr<float>();
  const float *s = scale.data_ptr<float>(), *m = minimum.data_ptr<float>(), *inv = inverse.data_ptr<float>();
  at::parallel_for(0, rows, kRowChunk, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += kRowChunk) {
      const int64_t last = std::min(first + kRowChunk, end);
      round_range(w, factor.data_ptr<float>(), n, rows, start, stop, update_end, s + first, m + first, inv + first,
                  static_cast<float>(low), static_cast<float>(high), levels.data_ptr<float>(),
                  errors.data_ptr<float>(), first, last);
    }
  });
}

// The same over whole 4-bit blocks of columns [start, end) (multiples of 32), pushing errors up to `end`: each
// block's scale and minimum fitted (`fit_block`, weighted by importance [n]) from the weights as the loop
// reaches it, written to scale and minimum [rows, n / 32] (fp32 values fp16 can hold).
void round_blocks(torch::Tensor columns, const torch::Tensor& factor, const torch::Tensor& importance,
                  const torch::Tensor& steps, int64_t start, int64_t end, torch::Tensor scale, torch::Tensor minimum,
                  torch::Tensor levels, torch::Tensor errors) {
  const int64_t n = columns.size(0), rows = columns.size(1), blocks = n / kBlock;
  check_fp32({&columns, &factor, &importance, &steps, &scale, &minimum, &levels, &errors});
  TORCH_CHECK(n % kBlock == 0 && start % kBlock == 0 && end % kBlock == 0 && 0 <= start && start <= end && end <= n,
              "round_blocks: whole blocks");
  TORCH_CHECK(factor.size(0) == n && factor.size(1) == n && importance.numel() == n, "round_blocks: factor, importance");
  TORCH_CHECK(scale.numel() == rows * blocks && minimum.numel() == rows * blocks, "round_blocks: [rows, n / 32]");
  TORCH_CHECK(levels.numel() == (end - start) * rows && errors.numel() == (end - start) * rows,
              "round_blocks: levels and errors [end - start, rows]");
  float* w = columns.data_ptr<float>();
  float *scale_out = scale.data_ptr<float>(), *minimum_out = minimum.data_ptr<float>();
  at::parallel_for(0, rows, kRowChunk, [&](int64_t begin, int64_t stop) {
    float s[kRowChunk], m[kRowChunk], inv[kRowChunk], x[kBlock];
    for (int64_t first = begin; first < stop; first += kRowChunk) {
      const int64_t last = std::min(first + kRowChunk, stop);
      for (int64_t b = start / kBlock; b < end / kBlock; ++b) {
        const int64_t c0 = b * kBlock;
        for (int64_t r = first; r < last; ++r) {
          const int64_t g = r - first;
          for (int64_t i = 0; i < kBlock; ++i) x[i] = w[(c0 + i) * rows + r];
          fit_block(x, importance.data_ptr<float>() + c0, steps.data_ptr<float>(), steps.numel(), s[g], m[g]);
          inv[g] = s[g] > 0 ? 1.0f / s[g] : 0.0f;
          scale_out[r * blocks + b] = s[g];
          minimum_out[r * blocks + b] = m[g];
        }
        round_range(w, factor.data_ptr<float>(), n, rows, c0, c0 + kBlock, end, s, m, inv, 0.0f, kQ4Max,
                    levels.data_ptr<float>() + (c0 - start) * rows, errors.data_ptr<float>() + (c0 - start) * rows,
                    first, last);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("round_columns", &round_columns, "GPTQ's column loop over a range of columns (rows in parallel)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("round_blocks", &round_blocks, "GPTQ's column loop over 4-bit blocks, each fitted as it is reached",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
