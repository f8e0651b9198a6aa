// Dot products over fp32 weight rows (AVX2 + FMA), shared by the kernels in this folder.
//
// Decode reads every weight once per token, so each thread reads its share of a weight matrix front to
// back, one row at a time: one sequential stream is what the hardware prefetchers follow best (a whole
// decode step measured here at 0.85-0.95 of a plain sum's bandwidth, against 0.76-0.86 with eight
// interleaved rows per pass).
// Functions stay out of line and reduce before any scalar tail: inlined into the callers' loops, or with
// scalar work keeping them live, GCC kept the accumulators on the stack (a quarter of the bandwidth).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

namespace boomerang {

// Allocates on cache-line boundaries: a 64-byte load from a buffer that malloc aligned to 16 bytes straddles
// two lines, which made a batch's dot products over a dequantized block run at two speeds from process to
// process.
template <class T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
using Floats = std::vector<float, LineAllocator<float>>;

inline float horizontal_sum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
  low = _mm_add_ps(low, high);
  __m128 shuffled = _mm_movehdup_ps(low);
  __m128 sums = _mm_add_ps(low, shuffled);
  shuffled = _mm_movehl_ps(shuffled, sums);
  return _mm_cvtss_f32(_mm_add_ss(sums, shuffled));
}

// The two cache lines 4 KiB ahead of `p` (one loop step of 32 floats), prefetched into every cache level: on
// Intel Xeons the non-temporal hint halves the read rate (it bypasses L2, whose streamer then stays idle),
// while on AMD EPYC both hints read alike (measured in docs/performance.md).
inline void prefetch_ahead(const float* p) {
  const char* ahead = reinterpret_cast<const char*>(p) + 4096;
  _mm_prefetch(ahead, _MM_HINT_T0);
  _mm_prefetch(ahead + 64, _MM_HINT_T0);
}

// w . x over n floats; four accumulators hide the FMA latency. With AVX-512, a cache line per load.
__attribute__((noinline)) inline float row_dot(const float* w, const float* x, int64_t n) {
#ifdef __AVX512F__
  const int64_t wide = n - n % 64;
  __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
  for (int64_t i = 0; i < wide; i += 64) {
    prefetch_ahead(w + i);
    prefetch_ahead(w + i + 32);
    b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), b0);
    b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), b1);
    b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), b2);
    b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), b3);
  }
  float wide_sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)));
  w += wide, x += wide, n -= wide;
#else
  float wide_sum = 0.f;
#endif
  const int64_t full = n - n % 32;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < full; i += 32) {
    prefetch_ahead(w + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  float sum = wide_sum + horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (int64_t i = full; i < n; ++i) sum += w[i] * x[i];
  return sum;
}

// The sum of n floats read as `row_dot` reads a weight row: what this loop can stream, for the bench's bound.
__attribute__((noinline)) inline float stream_sum(const float* p, int64_t n) {
  const int64_t full = n - n % 32;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < full; i += 32) {
    prefetch_ahead(p + i);
    a0 = _mm256_add_ps(_mm256_loadu_ps(p + i), a0);
    a1 = _mm256_add_ps(_mm256_loadu_ps(p + i + 8), a1);
    a2 = _mm256_add_ps(_mm256_loadu_ps(p + i + 16), a2);
    a3 = _mm256_add_ps(_mm256_loadu_ps(p + i + 24), a3);
  }
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (int64_t i = full; i < n; ++i) sum += p[i];
  return sum;
}

// w . x over a few floats (an attention head, a row to normalise): inlined, no call per key.
inline float short_dot(const float* w, const float* x, int64_t n) {
  const int64_t full = n - n % 16;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (int64_t i = 0; i < full; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  float sum = horizontal_sum(_mm256_add_ps(a0, a1));
  for (int64_t i = full; i < n; ++i) sum += w[i] * x[i];
  return sum;
}

// out[r] += w_r . x over `n` floats for eight weight rows w_r = w + r * stride: each load of x feeds eight FMAs.
// Meanwhile `lines` cache lines from `ahead` are prefetched, spread over the loop. With AVX-512 (built where
// the CPU has it), 16 floats per FMA: rows of a batch are compute-bound, not memory-bound.
#ifdef __AVX512F__
constexpr int64_t kDot8Width = 16;
using Lanes = __m512;
inline Lanes load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline Lanes fmadd_lanes(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline Lanes zero_lanes() { return _mm512_setzero_ps(); }
inline float sum_lanes(Lanes v) { return _mm512_reduce_add_ps(v); }
#else
constexpr int64_t kDot8Width = 8;
using Lanes = __m256;
inline Lanes load_lanes(const float* p) { return _mm256_loadu_ps(p); }
inline Lanes fmadd_lanes(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
inline Lanes zero_lanes() { return _mm256_setzero_ps(); }
inline float sum_lanes(Lanes v) { return horizontal_sum(v); }
#endif

__attribute__((noinline)) inline void dot8(const float* w, int64_t stride, int64_t n, const float* x, float* out,
                                           const char* ahead, int64_t lines) {
  const int64_t full = n - n % kDot8Width, loop_steps = std::max<int64_t>(1, full / kDot8Width);
  const int64_t per_step = (lines + loop_steps - 1) / loop_steps;
  Lanes acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = zero_lanes();
  int64_t line = 0;
  for (int64_t i = 0; i < full; i += kDot8Width) {
    for (int64_t k = 0; k < per_step && line < lines; ++k, ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    const Lanes xv = load_lanes(x + i);
    for (int r = 0; r < 8; ++r) acc[r] = fmadd_lanes(load_lanes(w + r * stride + i), xv, acc[r]);
  }
  for (int r = 0; r < 8; ++r) out[r] += sum_lanes(acc[r]);
  for (int64_t i = full; i < n; ++i)
    for (int r = 0; r < 8; ++r) out[r] += w[r * stride + i] * x[i];
}

// Columns of an eight-row block taken at a time, so the block's part stays in L1 while every input row
// passes over it (eight rows of 1536 floats alone fill an L1).
constexpr int64_t kBlockColumns = 768;

// y[b * y_stride + j] (`add`: +=) w_j . x_b over `width` columns for the eight rows w_j = w + j * stride and
// input rows x_b = x + b * x_stride; meanwhile `lines` cache lines from `ahead` are prefetched, a share per row.
inline void chunk_rows(const float* w, int64_t stride, int64_t width, const float* x, int64_t x_stride,
                       int64_t batch, float* y, int64_t y_stride, bool add, const char* ahead, int64_t lines) {
  const int64_t share = (lines + batch - 1) / batch;
  for (int64_t b = 0; b < batch; ++b) {
    float out[8] = {};
    const int64_t from = std::min(b * share, lines), to = std::min(from + share, lines);
    dot8(w, stride, width, x + b * x_stride, out, ahead + from * 64, to - from);
    for (int j = 0; j < 8; ++j) y[b * y_stride + j] = add ? y[b * y_stride + j] + out[j] : out[j];
  }
}

// y[b * y_stride + j] = w_j . x_b for the eight rows w_j = w + j * n and input rows x [batch, n], in column
// chunks of `kBlockColumns`; meanwhile `lines` cache lines from `ahead` are prefetched, spread over the chunks.
inline void block_rows(const float* w, int64_t n, const float* x, int64_t batch, float* y, int64_t y_stride,
                       const char* ahead, int64_t lines) {
  const int64_t chunks = (n + kBlockColumns - 1) / kBlockColumns, share = (lines + chunks - 1) / chunks;
  for (int64_t c = 0, chunk = 0; c < n; c += kBlockColumns, ++chunk) {
    const int64_t from = std::min(chunk * share, lines), to = std::min(from + share, lines);
    chunk_rows(w + c, n, std::min(kBlockColumns, n - c), x + c, n, batch, y, y_stride, c > 0, ahead + from * 64,
               to - from);
  }
}

// y[b * y_stride + (r - first)] = w_r . x_b for weight rows [first, last) of w [rows, n] and input rows
// x [batch, n]. One input row: each weight row is one sequential stream (bandwidth-bound decode). More:
// eight weight rows per pass, re-read from L1 for each input row, so loads of x do not dominate; while
// they are, the next eight rows are prefetched (to L1), a share per call, so memory and arithmetic
// overlap (measured in docs/performance.md).
inline void matvec_rows(const float* w, int64_t first, int64_t last, int64_t n, const float* x, int64_t batch,
                        float* y, int64_t y_stride) {
  int64_t r = first;
  if (batch > 1) {
    const int64_t block_lines = 8 * n * int64_t(sizeof(float)) / 64;
    for (; r + 8 <= last; r += 8) {
      const char* next = reinterpret_cast<const char*>(w + (r + 8) * n);
      const int64_t next_lines = r + 16 <= last ? block_lines : 0;  // only rows of this share
      block_rows(w + r * n, n, x, batch, y + r - first, y_stride, next, next_lines);
    }
  }
  for (; r < last; ++r)
    for (int64_t b = 0; b < batch; ++b) y[b * y_stride + r - first] = row_dot(w + r * n, x + b * n, n);
}

// A weight matrix [rows, n]: fp32; int8 with one fp32 scale per row (weight = q8 * scale); or 4-bit blocks of
// 32 with an fp16 scale and minimum each (weight = q4 * block_scale + block_min, `q4` packed as
// `services/family/q4.py` packs it). Decode is bound by reading the weights: int8 reads a quarter of the bytes,
// 4-bit about a sixth.
struct Weights {
  const float* f32 = nullptr;
  const int8_t* q8 = nullptr;
  const float* scale = nullptr;
  const uint8_t* q4 = nullptr;
  const uint16_t* block_scale = nullptr;
  const uint16_t* block_min = nullptr;
};

// Eight int8 weights from `w` as eight floats.
inline __m256 widen8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// w . x over n int8 weights, before the row's scale. Each 64 bytes of weights is one cache line, and the
// line 4 KiB ahead is prefetched as `row_dot` does.
__attribute__((noinline)) inline float row_dot_q8(const int8_t* w, const float* x, int64_t n) {
  const int64_t full = n - n % 64;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < full; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096, _MM_HINT_T0);
    const auto widen = [&](int64_t at) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + at))));
    };
    a0 = _mm512_fmadd_ps(widen(i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(widen(i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(widen(i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(widen(i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < full; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096, _MM_HINT_T0);
    for (int64_t j = i; j < i + 64; j += 32) {
      a0 = _mm256_fmadd_ps(widen8(w + j), _mm256_loadu_ps(x + j), a0);
      a1 = _mm256_fmadd_ps(widen8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
      a2 = _mm256_fmadd_ps(widen8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
      a3 = _mm256_fmadd_ps(widen8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
  }
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (int64_t i = full; i < n; ++i) sum += float(w[i]) * x[i];
  return sum;
}

// out [rows, n] = n columns of int8 rows w + r * stride times each row's scale.
inline void dequantize_rows(const int8_t* w, int64_t stride, const float* scale, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r]);
    const int8_t* row = w + r * stride;
    float* target = out + r * n;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 wide_scale = _mm512_set1_ps(scale[r]);
    for (; i + 16 <= n; i += 16) {
      const __m512i words = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      _mm512_storeu_ps(target + i, _mm512_mul_ps(_mm512_cvtepi32_ps(words), wide_scale));
    }
#endif
    const int64_t full = n - n % 8;
    for (; i < full; i += 8) _mm256_storeu_ps(target + i, _mm256_mul_ps(widen8(row + i), s));
    for (int64_t i = full; i < n; ++i) target[i] = float(row[i]) * scale[r];
  }
}

// `matvec_rows` over int8 weights. One input row: each weight row one int8 stream, scaled once. More: eight
// rows at a time, a column chunk at a time, dequantized once into an fp32 block that stays in L1, then
// `chunk_rows` for every input row, so the conversion is paid once per weight and step, not once per input row.
inline void matvec_rows_q8(const int8_t* w, const float* scale, int64_t first, int64_t last, int64_t n,
                           const float* x, int64_t batch, float* y, int64_t y_stride) {
  int64_t r = first;
  if (batch > 1) {
    thread_local Floats block;
    block.resize(8 * kBlockColumns);
    for (; r + 8 <= last; r += 8)
      for (int64_t c = 0; c < n; c += kBlockColumns) {
        const int64_t width = std::min(kBlockColumns, n - c);
        dequantize_rows(w + r * n + c, n, scale + r, 8, width, block.data());
        chunk_rows(block.data(), width, width, x + c, n, batch, y + r - first, y_stride, c > 0, nullptr, 0);
      }
  }
  for (; r < last; ++r)
    for (int64_t b = 0; b < batch; ++b) y[b * y_stride + r - first] = row_dot_q8(w + r * n, x + b * n, n) * scale[r];
}

// 4-bit weights. The input is quantized once per call to int8 per block of 32 (scale = the block's largest
// magnitude / 127, rounded to nearest, as llama.cpp's Q8_1), so each block's dot is integer arithmetic: 32
// byte products per instruction instead of 8 float FMAs. A block's minimum multiplies the exact sum of its
// inputs. A pair of blocks is one 32-byte load: block A's element j in the low nibble of byte j, block B's
// in the high nibble.
constexpr int64_t kBlock = 32;

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// q [n] int8, scale and sum [n / 32] of x [n], n a multiple of 32.
inline void quantize_input(const float* x, int64_t n, int8_t* q, float* scale, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < n / kBlock; ++b) {
    const float* v = x + b * kBlock;
    __m256 part[4];
    for (int i = 0; i < 4; ++i) part[i] = _mm256_loadu_ps(v + 8 * i);
    const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, part[0]), _mm256_andnot_ps(sign, part[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, part[2]), _mm256_andnot_ps(sign, part[3])));
    scale[b] = horizontal_max(amax) / 127.f;
    sum[b] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(part[0], part[1]), _mm256_add_ps(part[2], part[3])));
    const __m256 inverse = _mm256_set1_ps(scale[b] > 0 ? 1.f / scale[b] : 0.f);
    __m256i rounded[4];  // round to nearest even, the default rounding mode
    for (int i = 0; i < 4; ++i) rounded[i] = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(rounded[0], rounded[1]),
                                             _mm256_packs_epi32(rounded[2], rounded[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), _mm256_permutevar8x32_epi32(words, order));
  }
}

// Eight int32 partial sums of w . x over one block: w 32 values in 0..15, x 32 int8.
inline __m256i block_products(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// w . x for one row of n 4-bit weights against an input quantized by `quantize_input`; the blocks' int32
// sums are scaled into float lanes, one horizontal sum per row.
__attribute__((noinline)) inline float row_dot_q4(const uint8_t* w, const uint16_t* scale, const uint16_t* minimum,
                                                  const int8_t* xq, const float* x_scale, const float* x_sum,
                                                  int64_t n) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  float offset = 0;
  for (int64_t b = 0; b < n / kBlock; b += 2) {
    const uint8_t* pair = w + b * kBlock / 2;
    _mm_prefetch(reinterpret_cast<const char*>(pair) + 2048, _MM_HINT_T0);
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));
    const __m256i first = _mm256_and_si256(packed, low_nibbles);
    const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
    const __m256i d0 = block_products(first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock)));
    const __m256i d1 =
        block_products(second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + 1) * kBlock)));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(_cvtsh_ss(scale[b]) * x_scale[b]), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(_cvtsh_ss(scale[b + 1]) * x_scale[b + 1]), a1);
    offset += _cvtsh_ss(minimum[b]) * x_sum[b] + _cvtsh_ss(minimum[b + 1]) * x_sum[b + 1];
  }
  return horizontal_sum(_mm256_add_ps(a0, a1)) + offset;
}

// Rows [first, first + rows) of 4-bit weights into fp32 `out` [rows, n].
inline void dequantize_rows_q4(const Weights& w, int64_t first, int64_t rows, int64_t n, float* out) {
  const int64_t blocks = n / kBlock;
  const __m256i low_nibble = _mm256_set1_epi32(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w.q4 + (first + r) * n / 2;
    const uint16_t *scale = w.block_scale + (first + r) * blocks, *minimum = w.block_min + (first + r) * blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* pair = row + (b & ~int64_t(1)) * kBlock / 2;
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[b])), m = _mm256_set1_ps(_cvtsh_ss(minimum[b]));
      for (int i = 0; i < kBlock; i += 8) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + i)));
        v = b & 1 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, low_nibble);
        _mm256_storeu_ps(out + r * n + b * kBlock + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), s, m));
      }
    }
  }
}

// `matvec_rows` over 4-bit weights (n a multiple of 64). One input row: each weight row against the input
// quantized to 8 bits per block (integer dot products). More: eight weight rows at a time dequantized into an
// fp32 block that stays in cache and multiplied as fp32 weights are, so unpacking is paid once per weight and
// step, not once per input row.
inline void matvec_rows_q4(const Weights& w, int64_t first, int64_t last, int64_t n, const float* x, int64_t batch,
                           float* y, int64_t y_stride) {
  if (batch > 1) {
    thread_local Floats block;
    block.resize(8 * n);
    for (int64_t r = first; r < last; r += 8) {
      const int64_t rows = std::min<int64_t>(8, last - r);
      dequantize_rows_q4(w, r, rows, n, block.data());
      matvec_rows(block.data(), 0, rows, n, x, batch, y + (r - first), y_stride);
    }
    return;
  }
  const int64_t blocks = n / kBlock;  // one input row from here on
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> x_scale, x_sum;
  xq.resize(n);
  x_scale.resize(blocks);
  x_sum.resize(blocks);
  quantize_input(x, n, xq.data(), x_scale.data(), x_sum.data());
  for (int64_t r = first; r < last; ++r)
    y[r - first] = row_dot_q4(w.q4 + r * n / 2, w.block_scale + r * blocks, w.block_min + r * blocks, xq.data(),
                              x_scale.data(), x_sum.data(), n);
}

// `matvec_rows` over a matrix of any form.
inline void matvec_rows(const Weights& w, int64_t first, int64_t last, int64_t n, const float* x, int64_t batch,
                        float* y, int64_t y_stride) {
  if (w.q4)
    matvec_rows_q4(w, first, last, n, x, batch, y, y_stride);
  else if (w.q8)
    matvec_rows_q8(w.q8, w.scale, first, last, n, x, batch, y, y_stride);
  else
    matvec_rows(w.f32, first, last, n, x, batch, y, y_stride);
}

}  // namespace boomerang
