// Decode steps and prompts of Llama-style decoder layers in one call: fp32, AVX2 + FMA, a few rows (batch).
//
// The per-module Python of a transformers forward costs more than reading a small layer's weights, so
// this runs whole layers natively: RMSNorm, q/k/v, optional per-head q/k norm (Qwen3), rotary embedding,
// appending to the KV cache, attention over the cache, o_proj, RMSNorm, SiLU-gated MLP. A `LayerStack`
// holds pointers to the modules' own tensors (never copied) and runs all its layers in one parallel
// region: threads meet at five barriers per layer (six for a prompt), and nothing runs on one thread while
// the others wait (each thread computes the small per-row work, norms and rotations, for itself). Each
// weight row is read once per step. A prompt's positions are rows of the same call, so a short prompt costs
// what a decode step of that many rows costs, without a forward's per-operation overhead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "dot.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kMatrices = 7;  // q, k, v, o, gate, up, down
// the slots of the weight matrices; slot kTensorSlots + i holds matrix i's scales where it is int8 (per row,
// fp32) or 4-bit (per block, fp16), slot kTensorSlots + kMatrices + i its 4-bit block minimums, else nothing
constexpr int kMatrixSlots[kMatrices] = {1, 3, 5, 7, 12, 13, 14};
constexpr int kTensorSlots = 15;  // norms, matrices, biases and q/k norms
constexpr int kSlots = kTensorSlots + 2 * kMatrices;  // a layer's slots, in the order `layer_tensors` lists them

// One decoder layer's weights; nullptr where the layer has none (biases, q/k norms).
struct Layer {
  const float* input_norm;
  boomerang::Weights q;
  const float* q_bias;
  boomerang::Weights k;
  const float* k_bias;
  boomerang::Weights v;
  const float* v_bias;
  boomerang::Weights o;
  const float *o_bias, *q_norm, *k_norm, *post_norm;
  boomerang::Weights gate, up, down;
  int64_t inter, width;
};

const float* optional_data(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

bool is_matrix_slot(size_t slot) { return std::find(std::begin(kMatrixSlots), std::end(kMatrixSlots), slot) != std::end(kMatrixSlots); }

boomerang::Weights matrix_view(const torch::Tensor& weight, const torch::Tensor& scale, const torch::Tensor& minimum) {
  boomerang::Weights w;
  if (weight.scalar_type() == torch::kChar) {
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == weight.size(0),
                "LayerStack: an int8 matrix needs one fp32 scale per row");
    w.q8 = weight.data_ptr<int8_t>();
    w.scale = scale.data_ptr<float>();
  } else if (weight.scalar_type() == torch::kByte) {
    const int64_t blocks = weight.size(0) * weight.size(1) * 2 / boomerang::kBlock;
    TORCH_CHECK(weight.size(1) % boomerang::kBlock == 0 && scale.scalar_type() == torch::kHalf &&
                    minimum.scalar_type() == torch::kHalf && scale.numel() == blocks && minimum.numel() == blocks,
                "LayerStack: a 4-bit matrix needs rows of whole block pairs and an fp16 scale and minimum per block");
    w.q4 = weight.data_ptr<uint8_t>();
    w.block_scale = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
    w.block_min = reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>());
  } else {
    w.f32 = weight.data_ptr<float>();
  }
  return w;
}

Layer layer_view(const std::vector<torch::Tensor>& w) {
  TORCH_CHECK(w.size() == kSlots, "LayerStack: ", kSlots, " weight slots per layer");
  for (size_t slot = 0; slot < w.size(); ++slot) {
    const auto& t = w[slot];
    const auto type = t.scalar_type();
    const bool quantized = is_matrix_slot(slot) && (type == torch::kChar || type == torch::kByte);
    const bool block_constant = slot >= size_t(kTensorSlots) && type == torch::kHalf;
    TORCH_CHECK(!t.numel() || ((type == torch::kFloat || quantized || block_constant) && t.is_contiguous() &&
                               t.device().is_cpu()),
                "LayerStack: contiguous CPU weights, fp32 (matrices fp32, int8 or 4-bit) only");
  }
  const auto matrix = [&](int i) {
    return matrix_view(w[kMatrixSlots[i]], w[kTensorSlots + i], w[kTensorSlots + kMatrices + i]);
  };
  return {w[0].data_ptr<float>(), matrix(0),           optional_data(w[2]),     matrix(1),
          optional_data(w[4]),    matrix(2),           optional_data(w[6]),     matrix(3),
          optional_data(w[8]),    optional_data(w[9]), optional_data(w[10]),    w[11].data_ptr<float>(),
          matrix(4),              matrix(5),           matrix(6),               w[12].size(0),
          w[0].numel()};
}

// Sizes of one call: `batch` rows of hidden states, `tokens` new positions of each sequence (a decode step: one;
// a prompt: several), so `batch / tokens` sequences. `length` KV positions are filled before the call, which
// writes positions `length` to `length + tokens - 1`.
struct Shapes {
  int64_t batch, width, heads, kv_heads, head_dim, length, tokens = 1;
  int64_t sequences() const { return batch / tokens; }
  int64_t seen() const { return length + tokens; }
  int64_t q_width() const { return heads * head_dim; }
  int64_t kv_width() const { return kv_heads * head_dim; }
  int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

struct Norms {
  double eps, qk_eps, scaling;
};

// Rows [begin, end) of `parts` equal shares of `count`: this thread's share of a parallel phase.
struct Share {
  int64_t begin, end;
};
Share share_of(int64_t count, int part, int parts) { return {count * part / parts, count * (part + 1) / parts}; }

// out[b] = x[b] / rms(x[b]) * weight, over rows of `width` (also used per head, for q/k norms); the sum of
// squares in fp32, as transformers' RMSNorm computes its variance.
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t width, double eps, float* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = x + b * width;
    const float scale = 1.f / std::sqrt(boomerang::short_dot(row, row, width) / float(width) + float(eps));
    for (int64_t i = 0; i < width; ++i) out[b * width + i] = weight[i] * (x[b * width + i] * scale);
  }
}

// y[b, r] = w_r . x_b (+ bias_r) for rows r in `share` of w [out, in]; y [batch, y_stride], rows at `offset`.
void project(const boomerang::Weights& w, const float* bias, Share share, int64_t in, const float* x, int64_t batch, float* y,
             int64_t y_stride, int64_t offset = 0) {
  if (share.begin >= share.end) return;
  float* first = y + offset + share.begin;
  boomerang::matvec_rows(w, share.begin, share.end, in, x, batch, first, y_stride);
  if (bias)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = share.begin; r < share.end; ++r) first[b * y_stride + r - share.begin] += bias[r];
}

// This thread's share of the concatenated q/k/v rows: qkv [batch, qkv_width] = normed x [Wq; Wk; Wv]^T.
void project_qkv(const Layer& l, const Shapes& s, const float* normed, float* qkv, int part, int parts) {
  const Share all = share_of(s.qkv_width(), part, parts);
  const int64_t starts[3] = {0, s.q_width(), s.q_width() + s.kv_width()}, outs[3] = {s.q_width(), s.kv_width(),
                                                                                        s.kv_width()};
  const boomerang::Weights* weights[3] = {&l.q, &l.k, &l.v};
  const float* biases[3] = {l.q_bias, l.k_bias, l.v_bias};
  for (int i = 0; i < 3; ++i) {
    const Share mine{std::max(all.begin, starts[i]) - starts[i], std::min(all.end, starts[i] + outs[i]) - starts[i]};
    project(*weights[i], biases[i], mine, s.width, normed, s.batch, qkv, s.qkv_width(), starts[i]);
  }
}

// Rotary embedding of `heads` vectors of one row in place, rotate-half convention: cos, sin [head_dim].
void rotate(float* v, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = v + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// Optional q/k norms and rotary embedding of every row of qkv [batch, qkv_width], in place.
void position(const Layer& l, const Shapes& s, const Norms& n, const float* cos, const float* sin, float* qkv) {
  for (int64_t b = 0; b < s.batch; ++b) {
    float* q = qkv + b * s.qkv_width();
    float* k = q + s.q_width();
    if (l.q_norm) rms_norm(q, l.q_norm, s.heads, s.head_dim, n.qk_eps, q);
    if (l.k_norm) rms_norm(k, l.k_norm, s.kv_heads, s.head_dim, n.qk_eps, k);
    rotate(q, s.heads, s.head_dim, cos + b * s.head_dim, sin + b * s.head_dim);
    rotate(k, s.kv_heads, s.head_dim, cos + b * s.head_dim, sin + b * s.head_dim);
  }
}

// The KV cache of one layer: keys, values [batch, kv_heads, capacity, head_dim].
struct Cache {
  float *keys, *values;
  int64_t capacity;
  float* slot(float* base, const Shapes& s, int64_t b, int64_t kh, int64_t t) const {
    return base + ((b * s.kv_heads + kh) * capacity + t) * s.head_dim;
  }
};

// This thread's share of the (sequence, kv head) pairs: their new keys and values into the cache from `length`.
void append(const Shapes& s, const float* qkv, const Cache& c, int part, int parts) {
  const Share mine = share_of(s.sequences() * s.kv_heads, part, parts);
  for (int64_t task = mine.begin; task < mine.end; ++task) {
    const int64_t b = task / s.kv_heads, kh = task % s.kv_heads;
    for (int64_t t = 0; t < s.tokens; ++t) {
      const float* k = qkv + (b * s.tokens + t) * s.qkv_width() + s.q_width() + kh * s.head_dim;
      std::copy(k, k + s.head_dim, c.slot(c.keys, s, b, kh, s.length + t));
      std::copy(k + s.kv_width(), k + s.kv_width() + s.head_dim, c.slot(c.values, s, b, kh, s.length + t));
    }
  }
}

// exp(x) for 8 floats (Cephes' polynomial, ~1 ulp); 0 where x is -inf (masked positions).
__m256 exp8(__m256 x) {
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // x / ln 2, rounded
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);                  // x - n ln 2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));  // exp(r)
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));  // exp(r) * 2^n
}

// scores[t] = exp(scores[t] - best) for t < count; returns their sum.
float exponentiate(float* scores, int64_t count, float best) {
  const int64_t full = count - count % 8;
  __m256 total = _mm256_setzero_ps();
  for (int64_t t = 0; t < full; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(best)));
    _mm256_storeu_ps(scores + t, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = boomerang::horizontal_sum(total);
  for (int64_t t = full; t < count; ++t) sum += (scores[t] = std::exp(scores[t] - best));
  return sum;
}

// o = sum over t <= length of weights[t] * scale * v_t, v_t = values[t] (t < length) or new_value (t = length),
// o [dim]. Blocks of 32 dims stay in registers across all positions.
void weighted_sum(const float* weights, float scale, const float* values, const float* new_value, int64_t length,
                  int64_t dim, float* o) {
  const int64_t full = dim - dim % 32;
  for (int64_t d = 0; d < full; d += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t <= length; ++t) {
      if (weights[t] == 0.f) continue;
      const __m256 p = _mm256_set1_ps(weights[t] * scale);
      const float* v = (t < length ? values + t * dim : new_value) + d;
      a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), a2);
      a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), a3);
    }
    _mm256_storeu_ps(o + d, a0);
    _mm256_storeu_ps(o + d + 8, a1);
    _mm256_storeu_ps(o + d + 16, a2);
    _mm256_storeu_ps(o + d + 24, a3);
  }
  for (int64_t i = full; i < dim; ++i) {
    float sum = 0;
    for (int64_t t = 0; t <= length; ++t) sum += weights[t] * scale * (t < length ? values[t * dim + i] : new_value[i]);
    o[i] = sum;
  }
}

// The positions of row `b` this thread attends to: its share of those after the row's left padding, so rows
// of different prompt lengths in one batch still split evenly between the threads.
Share row_share(const Shapes& s, const int64_t* mask, int64_t b, int part, int parts) {
  const int64_t seen = s.seen(), *row = mask + b * seen;
  int64_t first = 0;
  while (first < seen && !row[first]) ++first;
  const Share mine = share_of(seen - first, part, parts);
  return {first + mine.begin, first + mine.end};
}

// This thread's part of softmax attention: for every (row, head), its share of the row's positions
// (`row_share`), as (max score, sum of exp(score - max), sum of exp(score - max) * value) in `part_max`,
// `part_sum` [batch, heads] and `part_out` [batch, q_width]; `combine` adds the threads' parts. Splitting
// positions rather than heads keeps the threads' shares equal (9 heads do not split in two) and grows with the
// context. Positions before `length` come from the cache, the new one from this thread's own qkv (another
// thread may be the one writing it to the cache); masked positions are skipped.
void attend(const Shapes& s, const Norms& n, const float* qkv, const Cache& c, const int64_t* mask, int part,
            int parts, float* part_max, float* part_sum, float* part_out, boomerang::Floats& scores) {
  const int64_t seen = s.seen(), dim = s.head_dim, group = s.heads / s.kv_heads;
  Share mine{0, 0};
  for (int64_t task = 0; task < s.batch * s.heads; ++task) {
    const int64_t b = task / s.heads, head = task % s.heads, kh = head / group;
    if (head == 0) mine = row_share(s, mask, b, part, parts);
    const int64_t count = mine.end - mine.begin;
    const float* q = qkv + b * s.qkv_width() + head * dim;
    const float* new_key = qkv + b * s.qkv_width() + s.q_width() + kh * dim;
    const float* keys = c.slot(c.keys, s, b, kh, 0);
    const float* values = c.slot(c.values, s, b, kh, 0);
    float* out = part_out + b * s.q_width() + head * dim;
    float best = -INFINITY;
    for (int64_t t = mine.begin; t < mine.end; ++t) {
      float& score = scores[t - mine.begin];
      score = mask[b * seen + t] ? boomerang::short_dot(q, t < s.length ? keys + t * dim : new_key, dim) *
                                       float(n.scaling)
                                 : -INFINITY;
      best = std::max(best, score);
    }
    part_max[task] = best;
    if (best == -INFINITY) {  // nothing to attend in this share (all left padding, or no positions)
      part_sum[task] = 0.f;
      std::fill(out, out + dim, 0.f);
      continue;
    }
    part_sum[task] = exponentiate(scores.data(), count, best);
    const float* last_value = mine.end == seen ? new_key + s.kv_width() : values + (mine.end - 1) * dim;
    weighted_sum(scores.data(), 1.f, values + mine.begin * dim, last_value, count - 1, dim, out);
  }
}

// out [batch, q_width] = the threads' attention parts (`attend`) put together: each rescaled from its own
// max to the overall one, then divided by the total.
void combine(const Shapes& s, int parts, const float* part_max, const float* part_sum, const float* part_out,
             float* out) {
  const int64_t pairs = s.batch * s.heads, dim = s.head_dim;
  std::vector<float> weights(parts);
  for (int64_t task = 0; task < pairs; ++task) {
    float best = -INFINITY;
    for (int p = 0; p < parts; ++p) best = std::max(best, part_max[p * pairs + task]);
    float total = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float m = part_max[p * pairs + task];
      weights[p] = m == -INFINITY ? 0.f : std::exp(m - best);
      total += weights[p] * part_sum[p * pairs + task];
    }
    float* o = out + task * dim;
    std::fill(o, o + dim, 0.f);
    for (int p = 0; p < parts; ++p) {
      const float scale = weights[p] / total;
      const float* partial = part_out + p * pairs * dim + task * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] += scale * partial[i];
    }
  }
}

// Attention of a prompt's positions (`tokens` > 1), every key already in the cache: this thread's share of the
// (row, head) pairs, each over the positions up to its own, into out [batch, q_width]. Masked (left-padding)
// positions are skipped; a row with none to attend (itself padding) gets zeros.
void attend_prompt(const Shapes& s, const Norms& n, const float* qkv, const Cache& c, const int64_t* mask,
                   Share mine, float* out, boomerang::Floats& scores) {
  const int64_t dim = s.head_dim, group = s.heads / s.kv_heads;
  for (int64_t task = mine.begin; task < mine.end; ++task) {
    const int64_t row = task / s.heads, head = task % s.heads, b = row / s.tokens, kh = head / group;
    const int64_t count = s.length + row % s.tokens + 1;  // positions this query sees
    const float* q = qkv + row * s.qkv_width() + head * dim;
    const float* keys = c.slot(c.keys, s, b, kh, 0);
    const float* values = c.slot(c.values, s, b, kh, 0);
    const int64_t* visible = mask + b * s.seen();
    float* o = out + row * s.q_width() + head * dim;
    float best = -INFINITY;
    for (int64_t t = 0; t < count; ++t) {
      scores[t] = visible[t] ? boomerang::short_dot(q, keys + t * dim, dim) * float(n.scaling) : -INFINITY;
      best = std::max(best, scores[t]);
    }
    if (best == -INFINITY) {
      std::fill(o, o + dim, 0.f);
      continue;
    }
    const float total = exponentiate(scores.data(), count, best);
    weighted_sum(scores.data(), 1.f / total, values, values + (count - 1) * dim, count - 1, dim, o);
  }
}

// Buffers every thread reads, each filled in shares between barriers: qkv [batch, qkv_width], projected
// [batch, width] and act [batch, inter] in shares of rows; attention parts per thread (`attend`):
// attn_max, attn_sum [threads, batch, heads], attn_out [threads, batch, q_width].
struct Shared {
  boomerang::Floats qkv, projected, act, attn_max, attn_sum, attn_out;
};

// Each thread's own buffers.
struct Own {
  boomerang::Floats normed, qkv, attn, residual, gated, linear, down, scores;
};

// Sizes `v` to n floats, keeping its memory: the buffers are reused from call to call (one set per thread),
// since a fresh buffer of a batch's or a prompt's size costs page faults on every call.
void fit(boomerang::Floats& v, int64_t n) { v.resize(size_t(n)); }

// out[j] = silu(gate[j]) * linear[j] = gate[j] / (1 + exp(-gate[j])) * linear[j] for j < n, 8 at a time.
void silu_times(const float* gate, const float* linear, int64_t n, float* out) {
  const int64_t full = n - n % 8;
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 denominator = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(g, denominator), _mm256_loadu_ps(linear + j)));
  }
  for (int64_t j = full; j < n; ++j) out[j] = gate[j] / (1.f + std::exp(-gate[j])) * linear[j];
}

// act[b, j] = silu(gate_j . x_b) * (up_j . x_b) for this thread's share of j.
void gated_mlp(const Layer& l, const Shapes& s, const float* x, float* act, Own& own, int part, int parts) {
  const Share mine = share_of(l.inter, part, parts);
  const int64_t count = mine.end - mine.begin;
  if (count <= 0) return;
  boomerang::matvec_rows(l.gate, mine.begin, mine.end, s.width, x, s.batch, own.gated.data(), count);
  boomerang::matvec_rows(l.up, mine.begin, mine.end, s.width, x, s.batch, own.linear.data(), count);
  for (int64_t b = 0; b < s.batch; ++b)
    silu_times(own.gated.data() + b * count, own.linear.data() + b * count, count, act + b * l.inter + mine.begin);
}

// One layer's decode step, run by every thread of the region; hidden h [batch, width] is updated in place
// and is complete for all threads on return.
void layer_step(const Layer& l, const Shapes& s, const Norms& n, const Cache& c, const int64_t* mask,
                const float* cos, const float* sin, float* h, Shared& shared, Own& own, int part, int parts) {
  rms_norm(h, l.input_norm, s.batch, s.width, n.eps, own.normed.data());
  project_qkv(l, s, own.normed.data(), shared.qkv.data(), part, parts);
#pragma omp barrier
  own.qkv.assign(shared.qkv.begin(), shared.qkv.end());
  position(l, s, n, cos, sin, own.qkv.data());
  append(s, own.qkv.data(), c, part, parts);
  const int64_t pairs = s.batch * s.heads;
  const float* attention = own.attn.data();
  if (s.tokens > 1) {  // a prompt: its queries read the keys other threads appended
#pragma omp barrier
    attend_prompt(s, n, own.qkv.data(), c, mask, share_of(pairs, part, parts), shared.attn_out.data(), own.scores);
#pragma omp barrier
    attention = shared.attn_out.data();
  } else {
    attend(s, n, own.qkv.data(), c, mask, part, parts, shared.attn_max.data() + part * pairs,
           shared.attn_sum.data() + part * pairs, shared.attn_out.data() + part * s.batch * s.q_width(), own.scores);
#pragma omp barrier
    combine(s, parts, shared.attn_max.data(), shared.attn_sum.data(), shared.attn_out.data(), own.attn.data());
  }
  project(l.o, l.o_bias, share_of(s.width, part, parts), s.q_width(), attention, s.batch, shared.projected.data(),
          s.width);
#pragma omp barrier
  for (int64_t i = 0; i < s.batch * s.width; ++i) own.residual[i] = h[i] + shared.projected[i];
  rms_norm(own.residual.data(), l.post_norm, s.batch, s.width, n.eps, own.normed.data());
  gated_mlp(l, s, own.normed.data(), shared.act.data(), own, part, parts);
#pragma omp barrier
  const Share rows = share_of(s.width, part, parts);
  project(l.down, nullptr, rows, l.inter, shared.act.data(), s.batch, own.down.data(), s.width);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t r = rows.begin; r < rows.end; ++r)
      h[b * s.width + r] = own.residual[b * s.width + r] + own.down[b * s.width + r];
#pragma omp barrier
}

// A model's decoder layers (or a run of them), over the modules' own tensors.
class LayerStack {
 public:
  LayerStack(std::vector<std::vector<torch::Tensor>> layers, int64_t heads, int64_t kv_heads, double norm_eps,
             double qk_norm_eps, double scaling)
      : tensors_(std::move(layers)), heads_(heads), kv_heads_(kv_heads), norms_{norm_eps, qk_norm_eps, scaling} {
    for (const auto& w : tensors_) layers_.push_back(layer_view(w));
    for (const auto& l : layers_) max_inter_ = std::max(max_inter_, l.inter);
  }

  // hidden [B, hidden_size] (a decode step) or [B, T, hidden_size] (T positions of a prompt) is updated in
  // place. keys[i], values[i]: layer i's cache [B, kv_heads, capacity, head_dim]; positions < `length` are
  // filled, this call writes positions `length` to `length + T - 1`. mask [B, length + T]: 0 where a
  // (left-padding) position must not be attended. cos, sin: [B, (T,) head_dim] for the new positions.
  void step(torch::Tensor hidden, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
            int64_t length, const torch::Tensor& mask, const torch::Tensor& cos, const torch::Tensor& sin) const {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one KV cache per layer");
    TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && mask.is_contiguous() &&
                cos.is_contiguous() && sin.is_contiguous(), "contiguous inputs only");
    TORCH_CHECK(hidden.dim() == 2 || hidden.dim() == 3, "hidden [B, hidden_size] or [B, T, hidden_size]");
    const int64_t sequences = hidden.size(0), tokens = hidden.dim() == 3 ? hidden.size(1) : 1;
    TORCH_CHECK(tokens >= 1 && cos.numel() == sin.numel() && cos.numel() == sequences * tokens * keys.at(0).size(3),
                "cos, sin [B, (T,) head_dim]");
    TORCH_CHECK(mask.scalar_type() == torch::kLong && mask.dim() == 2 && mask.size(0) == sequences &&
                    mask.size(1) == length + tokens,
                "mask [B, length + T], int64");
    TORCH_CHECK(hidden.size(-1) == layers_.at(0).width, "hidden states of the layers' width");
    const Shapes s{sequences * tokens, hidden.size(-1), heads_, kv_heads_, keys.at(0).size(3), length, tokens};
    std::vector<Cache> caches;
    for (size_t i = 0; i < keys.size(); ++i) {
      TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous() && keys[i].sizes() == values[i].sizes(),
                  "contiguous KV caches of one shape");
      TORCH_CHECK(keys[i].size(0) == sequences && keys[i].size(1) == kv_heads_ && keys[i].size(3) == s.head_dim,
                  "KV cache [B, kv_heads, capacity, head_dim]");
      TORCH_CHECK(length + tokens <= keys[i].size(2), "KV cache full");
      caches.push_back({keys[i].data_ptr<float>(), values[i].data_ptr<float>(), keys[i].size(2)});
    }
    const int threads = at::get_num_threads();
    thread_local Shared callers;
    Shared& shared = callers;  // the calling thread's: inside the region the name would be each thread's own
    fit(shared.qkv, s.batch * s.qkv_width());
    fit(shared.projected, s.batch * s.width);
    fit(shared.act, s.batch * max_inter_);
    fit(shared.attn_max, threads * s.batch * heads_);
    fit(shared.attn_sum, threads * s.batch * heads_);
    fit(shared.attn_out, threads * s.batch * s.q_width());
    float* h = hidden.data_ptr<float>();
#pragma omp parallel num_threads(threads)
    {
      const int part = omp_get_thread_num(), parts = omp_get_num_threads();
      thread_local Own own;
      for (auto* buffer : {&own.normed, &own.residual, &own.down}) fit(*buffer, s.batch * s.width);
      for (auto* buffer : {&own.gated, &own.linear}) fit(*buffer, s.batch * max_inter_);
      fit(own.attn, s.batch * s.q_width());
      fit(own.scores, s.seen());
      for (size_t i = 0; i < layers_.size(); ++i)
        layer_step(layers_[i], s, norms_, caches[i], mask.data_ptr<int64_t>(), cos.data_ptr<float>(),
                   sin.data_ptr<float>(), h, shared, own, part, parts);
    }
  }

  int64_t size() const { return int64_t(layers_.size()); }

 private:
  std::vector<std::vector<torch::Tensor>> tensors_;  // keeps the weights alive while `layers_` points at them
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, max_inter_ = 0;
  Norms norms_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LayerStack>(m, "LayerStack", "decoder layers whose decode steps run natively (fp32 or int8 weights, AVX2/FMA)")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, int64_t, int64_t, double, double, double>())
      .def("step", &LayerStack::step, "every layer, in order, over one new position (decode) or several (a prompt)")
      .def("__len__", &LayerStack::size);
}
