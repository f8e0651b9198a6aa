// One decode step of a Llama-style decoder layer in one call: fp32, AVX2 + FMA, a few rows (batch).
//
// The per-module Python of a transformers forward costs more than reading a small layer's weights, so
// this does the whole layer natively: RMSNorm, q/k/v, optional per-head q/k norm (Qwen3), rotary
// embedding, appending to the KV cache, attention over the cache, o_proj, RMSNorm, SiLU-gated MLP.
// Weights are the modules' own tensors (never copied); each weight row is read once per step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "dot.h"

#include <cmath>
#include <vector>

namespace {

// A weight matrix [out, in] applied to `batch` input rows, written to y [batch, y_stride] at `offset`.
struct Projection {
  const float* weight;
  const float* bias;  // nullptr: none
  int64_t out;
  float* y;
  int64_t offset;
};

// y = x W^T (+ b) for several projections of the same input x [batch, in]: this thread's share
// (`part` of `parts`) of all their rows, so one parallel pass covers them all.
void project_part(const std::vector<Projection>& projections, const float* x, int64_t batch, int64_t in,
                  int64_t y_stride, int part, int parts) {
  int64_t total = 0;
  for (const auto& p : projections) total += p.out;
  const int64_t begin = total * part / parts, end = total * (part + 1) / parts;
  int64_t first_row = 0;  // of the current projection, in the concatenation of all
  for (const auto& p : projections) {
    const int64_t lo = std::max(begin, first_row) - first_row, hi = std::min(end, first_row + p.out) - first_row;
    first_row += p.out;
    if (lo >= hi) continue;
    float* y = p.y + p.offset + lo;
    boomerang::matvec_rows(p.weight, lo, hi, in, x, batch, y, y_stride);
    if (p.bias)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t r = lo; r < hi; ++r) y[b * y_stride + r - lo] += p.bias[r];
  }
}

// act[b, j] = silu(gate_j . x_b) * (up_j . x_b), this thread's share of j.
void gated_mlp_part(const float* gate, const float* up, const float* x, int64_t batch, int64_t in, int64_t inter,
                    float* act, int part, int parts) {
  const int64_t begin = inter * part / parts, end = inter * (part + 1) / parts, count = end - begin;
  if (count <= 0) return;
  std::vector<float> gated(batch * count), linear(batch * count);  // [batch, count]
  boomerang::matvec_rows(gate, begin, end, in, x, batch, gated.data(), count);
  boomerang::matvec_rows(up, begin, end, in, x, batch, linear.data(), count);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < count; ++j) {
      const float g = gated[b * count + j];
      act[b * inter + begin + j] = g / (1.f + std::exp(-g)) * linear[b * count + j];
    }
}

// out[b] = x[b] / rms(x[b]) * weight, over rows of `width` (also used per head, for q/k norms).
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t width, double eps, float* out) {
  for (int64_t b = 0; b < rows; ++b) {
    double squares = 0;
    for (int64_t i = 0; i < width; ++i) squares += double(x[b * width + i]) * x[b * width + i];
    const float scale = 1.f / std::sqrt(float(squares / width) + float(eps));
    for (int64_t i = 0; i < width; ++i) out[b * width + i] = weight[i] * (x[b * width + i] * scale);
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

const float* optional_data(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// One layer's shapes and the step's scratch buffers.
struct Step {
  int64_t batch, width, heads, kv_heads, head_dim, capacity, length, inter;
  int64_t q_width, kv_width, qkv_width;
  std::vector<float> normed, qkv, attn, mlp, projected;
};

// Per row: optional q/k norms, rotary embedding, and this step's keys and values into the cache.
void position_and_cache(Step& st, const std::vector<torch::Tensor>& weights, double qk_norm_eps,
                        const float* cos, const float* sin, float* keys, float* values) {
  for (int64_t b = 0; b < st.batch; ++b) {
    float* q = st.qkv.data() + b * st.qkv_width;
    float* k = q + st.q_width;
    const float* v = k + st.kv_width;
    if (weights[9].numel()) rms_norm(q, weights[9].data_ptr<float>(), st.heads, st.head_dim, qk_norm_eps, q);
    if (weights[10].numel()) rms_norm(k, weights[10].data_ptr<float>(), st.kv_heads, st.head_dim, qk_norm_eps, k);
    rotate(q, st.heads, st.head_dim, cos + b * st.head_dim, sin + b * st.head_dim);
    rotate(k, st.kv_heads, st.head_dim, cos + b * st.head_dim, sin + b * st.head_dim);
    for (int64_t kh = 0; kh < st.kv_heads; ++kh) {
      const int64_t slot = ((b * st.kv_heads + kh) * st.capacity + st.length) * st.head_dim;
      std::copy(k + kh * st.head_dim, k + (kh + 1) * st.head_dim, keys + slot);
      std::copy(v + kh * st.head_dim, v + (kh + 1) * st.head_dim, values + slot);
    }
  }
}

// Softmax attention over the cache for (row, head) tasks [begin, end), skipping masked positions.
void attend(Step& st, int64_t begin, int64_t end, const float* keys, const float* values, const int64_t* allowed,
            double scaling) {
  const int64_t seen = st.length + 1, dim = st.head_dim, group = st.heads / st.kv_heads;
  std::vector<float> scores(seen);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / st.heads, head = task % st.heads, kh = head / group;
    const float* q = st.qkv.data() + b * st.qkv_width + head * dim;
    const float* k = keys + (b * st.kv_heads + kh) * st.capacity * dim;
    const float* v = values + (b * st.kv_heads + kh) * st.capacity * dim;
    float best = -INFINITY;
    for (int64_t t = 0; t < seen; ++t) {
      if (!allowed[b * seen + t]) { scores[t] = -INFINITY; continue; }
      scores[t] = boomerang::row_dot(q, k + t * dim, dim) * float(scaling);
      best = std::max(best, scores[t]);
    }
    float total = 0;
    for (int64_t t = 0; t < seen; ++t) total += (scores[t] = std::exp(scores[t] - best));
    float* out = st.attn.data() + b * st.q_width + head * dim;
    std::fill(out, out + dim, 0.f);
    for (int64_t t = 0; t < seen; ++t) {
      const float p = scores[t] / total;
      if (p != 0.f)
        for (int64_t i = 0; i < dim; ++i) out[i] += p * v[t * dim + i];
    }
  }
}

void add_into(float* h, const std::vector<float>& delta) {
  for (size_t i = 0; i < delta.size(); ++i) h[i] += delta[i];
}

}  // namespace

// weights: [input_norm, q, q_bias, k, k_bias, v, v_bias, o, o_bias, q_norm, k_norm, post_norm, gate, up, down]
// (an empty tensor where a layer has none). hidden [B, hidden_size] is updated in place.
// key_cache, value_cache: [B, kv_heads, capacity, head_dim]; positions < `length` are filled, this step
// writes position `length`. mask [B, length + 1]: 0 where a (left-padding) position must not be attended.
// cos, sin: [B, head_dim] for this step's positions. One parallel region for the whole layer: its threads
// meet at barriers between phases instead of being started for each matmul.
void decoder_layer_step(torch::Tensor hidden, const std::vector<torch::Tensor>& weights, torch::Tensor key_cache,
                        torch::Tensor value_cache, int64_t length, const torch::Tensor& mask,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t kv_heads,
                        double norm_eps, double qk_norm_eps, double scaling) {
  TORCH_CHECK(weights.size() == 15, "decoder_layer_step: 15 weight slots");
  TORCH_CHECK(hidden.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
              mask.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "contiguous inputs only");
  TORCH_CHECK(mask.scalar_type() == torch::kLong && mask.size(1) == length + 1, "mask [B, length + 1], int64");
  TORCH_CHECK(length < key_cache.size(2), "KV cache full");
  Step st;
  st.batch = hidden.size(0), st.width = hidden.size(1), st.heads = heads, st.kv_heads = kv_heads;
  st.head_dim = key_cache.size(3), st.capacity = key_cache.size(2), st.length = length;
  st.inter = weights[12].size(0), st.q_width = heads * st.head_dim, st.kv_width = kv_heads * st.head_dim;
  st.qkv_width = st.q_width + 2 * st.kv_width;
  st.normed.resize(st.batch * st.width), st.qkv.resize(st.batch * st.qkv_width);
  st.attn.resize(st.batch * st.q_width), st.mlp.resize(st.batch * st.inter), st.projected.resize(st.batch * st.width);
  float* h = hidden.data_ptr<float>();
  float* keys = key_cache.data_ptr<float>();
  float* values = value_cache.data_ptr<float>();
  const std::vector<Projection> qkv{
      {weights[1].data_ptr<float>(), optional_data(weights[2]), st.q_width, st.qkv.data(), 0},
      {weights[3].data_ptr<float>(), optional_data(weights[4]), st.kv_width, st.qkv.data(), st.q_width},
      {weights[5].data_ptr<float>(), optional_data(weights[6]), st.kv_width, st.qkv.data(), st.q_width + st.kv_width}};
  const std::vector<Projection> o{{weights[7].data_ptr<float>(), optional_data(weights[8]), st.width,
                                   st.projected.data(), 0}};
  const std::vector<Projection> down{{weights[14].data_ptr<float>(), nullptr, st.width, st.projected.data(), 0}};
  const int64_t tasks = st.batch * heads;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int part = omp_get_thread_num(), parts = omp_get_num_threads();
#pragma omp single
    rms_norm(h, weights[0].data_ptr<float>(), st.batch, st.width, norm_eps, st.normed.data());
    project_part(qkv, st.normed.data(), st.batch, st.width, st.qkv_width, part, parts);
#pragma omp barrier
#pragma omp single
    position_and_cache(st, weights, qk_norm_eps, cos.data_ptr<float>(), sin.data_ptr<float>(), keys, values);
    attend(st, tasks * part / parts, tasks * (part + 1) / parts, keys, values, mask.data_ptr<int64_t>(), scaling);
#pragma omp barrier
    project_part(o, st.attn.data(), st.batch, st.q_width, st.width, part, parts);
#pragma omp barrier
#pragma omp single
    {
      add_into(h, st.projected);
      rms_norm(h, weights[11].data_ptr<float>(), st.batch, st.width, norm_eps, st.normed.data());
    }
    gated_mlp_part(weights[12].data_ptr<float>(), weights[13].data_ptr<float>(), st.normed.data(), st.batch,
                   st.width, st.inter, st.mlp.data(), part, parts);
#pragma omp barrier
    project_part(down, st.mlp.data(), st.batch, st.inter, st.width, part, parts);
  }
  add_into(h, st.projected);
}

// Final norm and output layer for a few rows: logits [B, vocab].
torch::Tensor norm_and_head(const torch::Tensor& hidden, const torch::Tensor& norm_weight, double eps,
                            const torch::Tensor& head_weight) {
  const int64_t batch = hidden.size(0), width = hidden.size(1), vocab = head_weight.size(0);
  std::vector<float> normed(batch * width);
  rms_norm(hidden.data_ptr<float>(), norm_weight.data_ptr<float>(), batch, width, eps, normed.data());
  auto logits = torch::empty({batch, vocab}, hidden.options());
  const std::vector<Projection> head{{head_weight.data_ptr<float>(), nullptr, vocab, logits.data_ptr<float>(), 0}};
#pragma omp parallel num_threads(at::get_num_threads())
  project_part(head, normed.data(), batch, width, vocab, omp_get_thread_num(), omp_get_num_threads());
  return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decoder_layer_step", &decoder_layer_step, "one decode step of a Llama-style layer (fp32, AVX2/FMA)");
  m.def("norm_and_head", &norm_and_head, "final RMSNorm and output layer for a few rows");
}
