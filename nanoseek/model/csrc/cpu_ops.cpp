// Fused CPU kernels for inference: each replaces a chain of small ATen ops whose per-op dispatch and
// allocation cost dominates batch-1 decoding on CPU. Semantics (including where results are rounded to
// the input dtype) follow the PyTorch code they replace in nanoseek/model; tests/test_cpu_ops.py pins
// each kernel against it. Built on first use by nanoseek/model/cpu_ops.py. The kernels run on the
// calling thread (a decode step's few rows cost less than a parallel region), except routed_experts,
// which streams megabytes of weights and splits them over torch's threads (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t rows, int64_t dim, float eps) {
  std::vector<float> row(dim);
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = x + r * dim;
    T* out = y + r * dim;
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) {
      row[i] = static_cast<float>(in[i]);
      sum += row[i] * row[i];
    }
    const float inverse = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        out[i] = weight[i] * (row[i] * inverse);
      } else {  // normalized in fp32, rounded to T, then multiplied by the weight in T (HF's order)
        out[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(row[i] * inverse)));
      }
    }
  }
}

// e^x to ~2 ulp in a form the compiler vectorizes (std::exp is a scalar libm call per element):
// x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), e^r by its degree-6 Taylor polynomial
// (truncation ~1e-7), times 2^n built in the exponent bits. 0 below -87 (where fp32 underflows).
inline float vector_exp(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.f : p * scale;
}

template <typename T>
void silu_and_mul_rows(const T* x, T* y, int64_t rows, int64_t half) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * half;
    const T* up = gate + half;
    T* out = y + r * half;
    for (int64_t i = 0; i < half; ++i) {
      const float g = static_cast<float>(gate[i]);
      const T activated = static_cast<T>(g / (1.f + vector_exp(-g)));  // F.silu, rounded to T
      out[i] = static_cast<T>(static_cast<float>(activated) * static_cast<float>(up[i]));
    }
  }
}

// out[0:n] = sum_i weights[i * weight_stride] * rows[i * row_stride + 0:n]. Chunks of W outputs are
// summed in a local array the compiler keeps in vector registers (no store per row), so the loop over
// rows is bound by arithmetic, not by the latency of memory round trips.
template <int W>
int64_t weighted_rows_chunks(const float* weights, int64_t weight_stride, const float* rows, int64_t row_stride,
                             int64_t count, int64_t from, int64_t n, float* out) {
  for (; from + W <= n; from += W) {
    float sum[W] = {0.f};
    for (int64_t i = 0; i < count; ++i) {
      const float weight = weights[i * weight_stride];
      const float* row = rows + i * row_stride + from;
      for (int l = 0; l < W; ++l) sum[l] += weight * row[l];
    }
    std::copy(sum, sum + W, out + from);
  }
  return from;
}

void weighted_rows(const float* weights, int64_t weight_stride, const float* rows, int64_t row_stride, int64_t count,
                   int64_t n, float* out) {
  int64_t from = weighted_rows_chunks<128>(weights, weight_stride, rows, row_stride, count, 0, n, out);
  from = weighted_rows_chunks<16>(weights, weight_stride, rows, row_stride, count, from, n, out);
  weighted_rows_chunks<1>(weights, weight_stride, rows, row_stride, count, from, n, out);
}

constexpr int64_t HEAD_LANES = 8;           // heads scored together: one vector of fp32 per key
constexpr int64_t KEYS_IN_FLIGHT = 8;       // independent sums per head vector, to hide the add latency
constexpr int64_t PREFETCH_ROWS_AHEAD = 8;  // cached rows requested ahead of their conversion
typedef float HeadVector __attribute__((vector_size(HEAD_LANES * sizeof(float))));  // GCC/Clang vectors

// scores[t * lanes + h] = scale * query[h] . keys[t] for every head at once. The query comes
// dimension-major (query_t [dims][lanes], heads padded to a multiple of HEAD_LANES with zeros), so each
// cached value is broadcast against a vector of heads: no horizontal sums, and each cached row is read
// once per HEAD_LANES heads. `keys` rows are `dims` fp32 values, padded to a multiple of KEYS_IN_FLIGHT.
void head_scores(const float* query_t, int64_t lanes, const float* keys, int64_t dims, int64_t key_count,
                 float scale, float* scores) {
  for (int64_t h = 0; h < lanes; h += HEAD_LANES) {
    for (int64_t t = 0; t < key_count; t += KEYS_IN_FLIGHT) {
      HeadVector sum[KEYS_IN_FLIGHT] = {};
      const float* block = keys + t * dims;
      for (int64_t d = 0; d < dims; ++d) {
        HeadVector q;
        std::memcpy(&q, query_t + d * lanes + h, sizeof q);
        for (int64_t k = 0; k < KEYS_IN_FLIGHT; ++k) sum[k] += block[k * dims + d] * q;
      }
      for (int64_t k = 0; k < KEYS_IN_FLIGHT && t + k < key_count; ++k) {
        const HeadVector scaled = sum[k] * scale;
        std::memcpy(scores + (t + k) * lanes + h, &scaled, sizeof scaled);
      }
    }
  }
}

// In place, scores [keys][lanes] -> probabilities over the keys row_mask allows (others 0), per lane:
// vectorized across lanes (heads). peak and total are scratch [lanes].
void softmax_over_keys(float* scores, int64_t keys, int64_t lanes, const bool* row_mask, int64_t mask_stride,
                       float* peak, float* total) {
  std::fill(peak, peak + lanes, -std::numeric_limits<float>::infinity());
  std::fill(total, total + lanes, 0.f);
  for (int64_t t = 0; t < keys; ++t) {
    if (!row_mask[t * mask_stride]) continue;
    const float* row = scores + t * lanes;
    for (int64_t h = 0; h < lanes; ++h) peak[h] = std::max(peak[h], row[h]);
  }
  for (int64_t t = 0; t < keys; ++t) {
    float* row = scores + t * lanes;
    if (!row_mask[t * mask_stride]) { std::fill(row, row + lanes, 0.f); continue; }
    for (int64_t h = 0; h < lanes; ++h) total[h] += (row[h] = vector_exp(row[h] - peak[h]));
  }
  for (int64_t h = 0; h < lanes; ++h) total[h] = total[h] > 0.f ? 1.f / total[h] : 0.f;
  for (int64_t t = 0; t < keys; ++t)
    for (int64_t h = 0; h < lanes; ++h) scores[t * lanes + h] *= total[h];
}

// Ask for the cache lines of values[0:n] ahead of their use.
template <typename T>
inline void prefetch(const T* values, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(values);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

template <typename T>
void to_float(const T* in, int64_t cols, float* out) {
  for (int64_t i = 0; i < cols; ++i) out[i] = static_cast<float>(in[i]);
}

// MLA's absorbed attention for the few queries of a decode or verify step, in fp32:
// q_latent = q_nope W_UK per head; score_t = scale (q_latent . c_t + q_pe . k_pe_t), masked;
// softmax over t; out = (sum_t p_t c_t) W_UV. Each cached row [c_t | k_pe_t] is converted to fp32 once
// per sequence; scores and the softmax run over all heads at once (vectors of heads), the weighted
// sums over rows with register accumulators. The cache comes gathered (latent [b, t, rank], k_pe
// [b, t, rope]) or as the paged pool itself (latent [slots, rank], k_pe [slots, rope]) with `slots`
// [b, >= t] mapping each row's positions, so the kernel reads each cached row where it lies instead of
// from a gathered copy.
constexpr int64_t MLA_PARALLEL_MIN_WORK = 1 << 17;  // multiply-adds (see mla_decode_rows' end)

template <typename T>
void mla_decode_rows(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& latent,
                     const torch::Tensor& k_pe, const c10::optional<torch::Tensor>& slots, const torch::Tensor& mask,
                     const float* w_uk, const float* w_uv_t, float scale, torch::Tensor& out) {
  const int64_t batch = q_nope.size(0), seq = q_nope.size(1), heads = q_nope.size(2), nope = q_nope.size(3);
  const int64_t rope = q_pe.size(3), keys = mask.size(3), rank = latent.size(-1), value_dim = out.size(3);
  const int64_t dims = rank + rope, lanes = (heads + HEAD_LANES - 1) / HEAD_LANES * HEAD_LANES;
  const int64_t padded_keys = (keys + KEYS_IN_FLIGHT - 1) / KEYS_IN_FLIGHT * KEYS_IN_FLIGHT;
  const bool paged = slots.has_value();
  const int64_t* slot = paged ? slots->data_ptr<int64_t>() : nullptr;
  const int64_t slot_row = paged ? slots->stride(0) : 0;
  // Where row t of batch b lies in a [b, t, d] tensor or in the pool.
  // (Pointers and strides are read once here: `data_ptr` checks the tensor at every call, which had cost
  // ~6% of a batch-1 `small` call when taken per cached row and per head.)
  struct Rows {
    const T* data;
    int64_t batch_stride, row_stride;
  };
  const Rows latent_rows{latent.data_ptr<T>(), latent.stride(0), paged ? 0 : latent.stride(1)},
      k_pe_rows{k_pe.data_ptr<T>(), k_pe.stride(0), paged ? 0 : k_pe.stride(1)};
  auto row_of = [&](const Rows& cached, int64_t b, int64_t t) {
    return cached.data + (paged ? slot[b * slot_row + t] * cached.batch_stride : b * cached.batch_stride + t * cached.row_stride);
  };
  const T* q_nope_data = q_nope.data_ptr<T>();
  const T* q_pe_data = q_pe.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t q_head = q_nope.stride(2), pe_head = q_pe.stride(2);
  const bool* allowed = mask.data_ptr<bool>();
  // A sequence's working space, reused by the sequences a thread runs: its cached rows [padded_keys]
  // [rank | rope] (pad rows zero) in fp32, then per query the absorbed latents [heads][rank] and the
  // query [dims][lanes] (pad lanes zero), scores then probabilities [keys][lanes], the mixed latents
  // [heads][rank].
  struct Buffers {
    std::vector<float> cached, query_t, latents, scores, mixed, peak, total;
  };
  auto buffers = [&]() {
    return Buffers{std::vector<float>(padded_keys * dims, 0.f), std::vector<float>(dims * lanes, 0.f),
                   std::vector<float>(heads * rank), std::vector<float>(keys * lanes), std::vector<float>(heads * rank),
                   std::vector<float>(lanes), std::vector<float>(lanes)};
  };
  // One sequence. With `split_heads` (a batch of one) the per-head products with W_UK and W_UV, which
  // read 2 x heads x nope x rank weights, run on torch's threads.
  auto sequence = [&](int64_t b, bool split_heads, Buffers& space) {
    std::vector<float> &cached = space.cached, &query_t = space.query_t, &latents = space.latents,
                        &scores = space.scores, &mixed = space.mixed, &peak = space.peak, &total = space.total;
    auto over_heads = [&](auto&& body) {
      if (split_heads)
        at::parallel_for(0, heads, 1, body);
      else
        body(0, heads);
    };
    for (int64_t t = 0; t < keys; ++t) {
      if (t + PREFETCH_ROWS_AHEAD < keys) {
        prefetch(row_of(latent_rows, b, t + PREFETCH_ROWS_AHEAD), rank);
        prefetch(row_of(k_pe_rows, b, t + PREFETCH_ROWS_AHEAD), rope);
      }
      to_float(row_of(latent_rows, b, t), rank, cached.data() + t * dims);
      to_float(row_of(k_pe_rows, b, t), rope, cached.data() + t * dims + rank);
    }
    for (int64_t s = 0; s < seq; ++s) {
      const T* qn = q_nope_data + b * q_nope.stride(0) + s * q_nope.stride(1);
      const T* qp = q_pe_data + b * q_pe.stride(0) + s * q_pe.stride(1);
      over_heads([&](int64_t first, int64_t last) {  // absorbed: q_latent = q_nope W_UK[h]
        std::vector<float> nope_row(nope);
        for (int64_t h = first; h < last; ++h) {
          to_float(qn + h * q_head, nope, nope_row.data());
          weighted_rows(nope_row.data(), 1, w_uk + h * nope * rank, rank, nope, rank, latents.data() + h * rank);
        }
      });
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < rank; ++d) query_t[d * lanes + h] = latents[h * rank + d];
        for (int64_t d = 0; d < rope; ++d) query_t[(rank + d) * lanes + h] = static_cast<float>(qp[h * pe_head + d]);
      }
      head_scores(query_t.data(), lanes, cached.data(), dims, keys, scale, scores.data());
      const bool* row_mask = allowed + (b * mask.stride(0) + s * mask.stride(2));
      softmax_over_keys(scores.data(), keys, lanes, row_mask, mask.stride(3), peak.data(), total.data());
      over_heads([&](int64_t first, int64_t last) {
        std::vector<float> head_out(value_dim);
        for (int64_t h = first; h < last; ++h) {
          float* mix = mixed.data() + h * rank;
          weighted_rows(scores.data() + h, lanes, cached.data(), dims, keys, rank, mix);
          weighted_rows(mix, 1, w_uv_t + h * rank * value_dim, value_dim, rank, value_dim, head_out.data());
          T* o = out_data + ((b * seq + s) * heads + h) * value_dim;
          for (int64_t v = 0; v < value_dim; ++v) o[v] = static_cast<T>(head_out[v]);
        }
      });
    }
  };
  // Enough work for the threads (waking the second costs a few microseconds: a nano model's 4 heads x
  // 32 ranks stay on one): one sequence splits its heads, more split the sequences (each computed the
  // same way whatever the split).
  const bool parallel = batch * seq * heads * rank * (nope + value_dim + 2 * keys) >= MLA_PARALLEL_MIN_WORK;
  auto sequences = [&](int64_t first, int64_t last) {
    Buffers space = buffers();
    for (int64_t b = first; b < last; ++b) sequence(b, batch == 1 && parallel, space);
  };
  if (batch > 1 && parallel)
    at::parallel_for(0, batch, 1, sequences);
  else
    sequences(0, batch);
}

typedef float Vector16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t Mask16 __attribute__((vector_size(16 * sizeof(int32_t))));
typedef uint16_t Half16 __attribute__((vector_size(16 * sizeof(uint16_t))));

// 16 values from p as fp32 (bf16 widened by a shift into the high half: exact).
template <typename T>
inline Vector16 load16(const T* p) {
  Vector16 v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    Half16 bits;
    std::memcpy(&bits, p, sizeof bits);
    const Mask16 wide = __builtin_convertvector(bits, Mask16) << 16;
    std::memcpy(&v, &wide, sizeof v);
#if defined(__AVX512F__)
  } else if constexpr (std::is_same_v<T, int8_t>) {  // GCC 12 turns __builtin_convertvector of bytes into scalar code
    const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    std::memcpy(&v, &wide, sizeof v);
#endif
  } else {
    for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  }
  return v;
}

// The first `count` (1 to 16) values from p as fp32, the other lanes 0, reading nothing past p[count - 1]:
// the last partial vector of a row whose length is not a multiple of 16 (a head dim of 24), so the
// kernels need no scalar tail loop.
template <typename T>
inline Vector16 load16_tail(const T* p, int64_t count) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 wide = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
    Vector16 v;
    std::memcpy(&v, &wide, sizeof v);
    return v;
  }
#endif
#if defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // widened as load16 does: the bits into the high half
    const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
    const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    Vector16 v;
    std::memcpy(&v, &wide, sizeof v);
    return v;
  }
#endif
  T buffer[16] = {};
  std::memcpy(buffer, p, count * sizeof(T));
  return load16(buffer);
}

#if defined(__AVX512F__)
inline __m512 as_m512(const Vector16& v) {
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  return x;
}

inline Vector16 as_vector16(const __m512& x) {
  Vector16 v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}
#endif

inline Vector16 load16f(const float* p) {
  Vector16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, const Vector16& v) { std::memcpy(p, &v, sizeof v); }

// The first `count` (1 to 16) lanes of v to p, writing nothing past p[count - 1].
inline void store16_tail(float* p, const Vector16& v, int64_t count) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), as_m512(v));
#else
  std::memcpy(p, &v, count * sizeof(float));
#endif
}

// Rotary embedding of x [batch, seq, heads, dim] (last dimension contiguous) by angles cos/sin
// [batch or 1, seq, dim / 2] (fp32), computed in fp32 and rounded to x's dtype. Interleaved rotates
// the pairs (x0, x1), (x2, x3)... (DeepSeek's MLA); otherwise channel i with i + dim / 2 (NeoX).
// fp32 rows go 16 values at a time (AVX-512): the same multiplies and adds per value as the scalar
// loop (this part of the file is compiled without contraction), so the same results.
template <typename T>
void rope_rows(const T* x, const float* cos, const float* sin, T* y, int64_t batch, int64_t seq, int64_t heads,
               int64_t dim, const int64_t* x_strides, int64_t angle_batch_stride, bool interleaved) {
  const int64_t half = dim / 2;
  for (int64_t row = 0; row < batch * seq * heads; ++row) {
    const int64_t b = row / (seq * heads), s = row / heads % seq, h = row % heads;
    const T* in = x + b * x_strides[0] + s * x_strides[1] + h * x_strides[2];
    const float* c = cos + b * angle_batch_stride + s * half;
    const float* n = sin + b * angle_batch_stride + s * half;
    T* out = y + row * dim;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      if (interleaved) {  // lanes (2i, 2i + 1) hold a pair: cos/sin widened to both, the pair swapped
        const __m512i widen = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512 signs = _mm512_set_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
        for (int64_t i = 0; i < dim; i += 16) {
          const int64_t count = std::min<int64_t>(16, dim - i);
          const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
          const __mmask16 pairs = static_cast<__mmask16>((1u << (count / 2)) - 1);
          const __m512 v = _mm512_maskz_loadu_ps(lanes, in + i), swapped = _mm512_permute_ps(v, 0xB1);
          const __m512 cv = _mm512_permutexvar_ps(widen, _mm512_maskz_loadu_ps(pairs, c + i / 2));
          const __m512 sv = _mm512_mul_ps(_mm512_permutexvar_ps(widen, _mm512_maskz_loadu_ps(pairs, n + i / 2)), signs);
          _mm512_mask_storeu_ps(out + i, lanes, _mm512_add_ps(_mm512_mul_ps(v, cv), _mm512_mul_ps(swapped, sv)));
        }
      } else {
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, half - i)) - 1);
          const __m512 a = _mm512_maskz_loadu_ps(lanes, in + i), b2 = _mm512_maskz_loadu_ps(lanes, in + half + i);
          const __m512 cv = _mm512_maskz_loadu_ps(lanes, c + i), sv = _mm512_maskz_loadu_ps(lanes, n + i);
          _mm512_mask_storeu_ps(out + i, lanes, _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(b2, sv)));
          _mm512_mask_storeu_ps(out + half + i, lanes, _mm512_add_ps(_mm512_mul_ps(b2, cv), _mm512_mul_ps(a, sv)));
        }
      }
      continue;
    }
#endif
    for (int64_t i = 0; i < half; ++i) {
      const int64_t first = interleaved ? 2 * i : i, second = interleaved ? 2 * i + 1 : i + half;
      const float a = static_cast<float>(in[first]), b2 = static_cast<float>(in[second]);
      out[first] = static_cast<T>(a * c[i] - b2 * n[i]);
      out[second] = static_cast<T>(b2 * c[i] + a * n[i]);
    }
  }
}

// Products of few vectors with a row-major [rows][n] matrix, fp32 sums: out[v][r] = w[r] . xs[v].
// Blocks of MATRIX_ROWS rows x up to VECTORS_AT_ONCE vectors keep their sums in registers (each
// weight vector loaded once per block serves every vector: GEMM register blocking, and independent
// sums hide the add latency); a block's rows stay in L1 while the vectors pass over them, so the
// weights stream from memory once, in order.
// These products and the training attention below are the places the build's -ffp-contract=off is
// lifted: fused multiply-adds double their arithmetic rate (a multiply and an add each take a vector
// pipe), and nothing needs them to round like a PyTorch op (a GEMM's summation order is its own).
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
constexpr int64_t MATRIX_ROWS = 4;
constexpr int64_t VECTORS_AT_ONCE = 6;

typedef float Vector8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vector4 __attribute__((vector_size(4 * sizeof(float))));

// The sum of a vector's lanes by halving (16 -> 8 -> 4 -> 1: a few shuffles and adds, not 16 extracts).
inline float lane_sum(const Vector16& v) {
  Vector8 low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  const Vector8 eight = low + high;
  Vector4 first, second;
  std::memcpy(&first, &eight, sizeof first);
  std::memcpy(&second, reinterpret_cast<const char*>(&eight) + sizeof first, sizeof second);
  const Vector4 four = first + second;
  return (four[0] + four[2]) + (four[1] + four[3]);
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)  // Clang, GCC >= 12
#define NANOSEEK_SHUFFLEVECTOR 1
#endif
#endif

#ifdef NANOSEEK_SHUFFLEVECTOR
// The lane sums of four vectors at once, by halving all four together (15 shuffles and adds for four
// results instead of ~8 operations each: at n = 256 they would cost half as much as the products).
inline Vector4 lane_sums4(const Vector16& a, const Vector16& b, const Vector16& c, const Vector16& d) {
  const Vector16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const Vector16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const Vector16 fours = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                         __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const Vector8 twos = __builtin_shufflevector(fours, fours, 0, 2, 4, 6, 8, 10, 12, 14) +
                       __builtin_shufflevector(fours, fours, 1, 3, 5, 7, 9, 11, 13, 15);
  return __builtin_shufflevector(twos, twos, 0, 2, 4, 6) + __builtin_shufflevector(twos, twos, 1, 3, 5, 7);
}
#endif

template <int ROWS, int VECTORS, typename T>
void product_block(const T* w, const float* scale, int64_t n, const float* xs, float* out, int64_t out_stride) {
  const int64_t whole = n / 16 * 16;
  Vector16 sums[ROWS][VECTORS] = {};
  for (int64_t i = 0; i < whole; i += 16) {
    Vector16 weights[ROWS];
    for (int r = 0; r < ROWS; ++r) weights[r] = load16(w + r * n + i);
    for (int v = 0; v < VECTORS; ++v) {
      Vector16 x = load16(xs + v * n + i);
#if defined(__x86_64__) && defined(__AVX512F__)
      asm("" : "+v"(x));  // held in a register: otherwise GCC reloads it for each row (more loads than FMAs)
#endif
      for (int r = 0; r < ROWS; ++r) sums[r][v] += weights[r] * x;
    }
  }
  for (int v = 0; v < VECTORS; ++v) {
    float row_sums[ROWS];
#ifdef NANOSEEK_SHUFFLEVECTOR
    if constexpr (ROWS == 4) {
      const Vector4 four = lane_sums4(sums[0][v], sums[1][v], sums[2][v], sums[3][v]);
      for (int r = 0; r < 4; ++r) row_sums[r] = four[r];
    } else
#endif
    {
      for (int r = 0; r < ROWS; ++r) row_sums[r] = lane_sum(sums[r][v]);
    }
    for (int r = 0; r < ROWS; ++r) {
      for (int64_t i = whole; i < n; ++i) row_sums[r] += static_cast<float>(w[r * n + i]) * xs[v * n + i];
      out[v * out_stride + r] = scale == nullptr ? row_sums[r] : row_sums[r] * scale[r];
    }
  }
}

// The last `count` (< VECTORS_AT_ONCE) vectors as one block.
template <int ROWS, int VECTORS, typename T>
void product_rest(const T* w, const float* scale, int64_t n, const float* xs, int64_t count, float* out,
                  int64_t out_stride) {
  if constexpr (VECTORS > 0) {
    if (count == VECTORS) return product_block<ROWS, VECTORS>(w, scale, n, xs, out, out_stride);
    product_rest<ROWS, VECTORS - 1>(w, scale, n, xs, count, out, out_stride);
  }
}

template <int ROWS, typename T>
void product_rows(const T* w, const float* scale, int64_t n, const float* xs, int64_t vectors, float* out,
                  int64_t out_stride) {
  int64_t v = 0;
  for (; v + VECTORS_AT_ONCE <= vectors; v += VECTORS_AT_ONCE)
    product_block<ROWS, VECTORS_AT_ONCE>(w, scale, n, xs + v * n, out + v * out_stride, out_stride);
  product_rest<ROWS, VECTORS_AT_ONCE - 1>(w, scale, n, xs + v * n, vectors - v, out + v * out_stride, out_stride);
}

// out[v][r] = w[r] . xs[v] for rows [from, to) of w and `vectors` vectors xs [vectors][n].
// Many vectors (prefill) go in tiles of TILE_VECTORS that stay in L1 while TILE_ROWS rows (in L2) pass
// over them; a decode step's few vectors are one tile, so its weights are read once either way.
constexpr int64_t TILE_VECTORS = 6;
constexpr int64_t TILE_ROWS = 64;

template <typename T>
void matrix_vectors(const T* w, const float* scale, int64_t n, const float* xs, int64_t vectors, int64_t from,
                    int64_t to, float* out, int64_t out_stride) {
  for (int64_t rows = from; rows < to; rows += TILE_ROWS) {
    const int64_t rows_end = std::min(to, rows + TILE_ROWS);
    for (int64_t v = 0; v < vectors; v += TILE_VECTORS) {
      const int64_t count = std::min(TILE_VECTORS, vectors - v);
      const float* tile = xs + v * n;
      float* tile_out = out + v * out_stride;
      int64_t r = rows;
      for (; r + MATRIX_ROWS <= rows_end; r += MATRIX_ROWS)
        product_rows<MATRIX_ROWS>(w + r * n, scale ? scale + r : nullptr, n, tile, count, tile_out + r, out_stride);
      for (; r < rows_end; ++r) product_rows<1>(w + r * n, scale ? scale + r : nullptr, n, tile, count, tile_out + r, out_stride);
    }
  }
}

// Products with an fp32 weight packed in panels of PANEL outputs: panels [P][n][PANEL], panel p holding
// outputs p * PANEL ... + PANEL - 1 (zero past the last) with their n inputs interleaved, so that input
// k of all PANEL outputs is two contiguous vectors. A block of PANEL_ROWS input rows keeps its
// PANEL_ROWS x 2 vectors of sums in registers while the panel streams by once: per input k, two
// weight loads and PANEL_ROWS broadcasts feed 2 x PANEL_ROWS FMAs (no horizontal sums, unlike
// matrix_vectors), which is what a GEMM's inner kernel does. The panel is read once per block of
// rows: from memory for the first, from L2 after (a 512-input panel is 64 KB).
constexpr int64_t PANEL = 32;
constexpr int PANEL_ROWS = 8;

template <int ROWS, typename T = float>
void panel_block(const T* panel, int64_t n, const float* xs, int64_t x_stride, float* out, int64_t out_stride,
                 int64_t valid, const T* fetch = nullptr) {
  Vector16 low[ROWS], high[ROWS];
  for (int r = 0; r < ROWS; ++r) low[r] = high[r] = Vector16{};
  for (int64_t k = 0; k < n; ++k) {
    const Vector16 w_low = load16(panel + k * PANEL), w_high = load16(panel + k * PANEL + 16);
    if (fetch != nullptr) __builtin_prefetch(fetch + k * 16);  // a line of the next panel (see panel_rows)
    for (int r = 0; r < ROWS; ++r) {
      const float x = xs[r * x_stride + k];
      low[r] += x * w_low;
      high[r] += x * w_high;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    if (valid == PANEL) {
      std::memcpy(out + r * out_stride, &low[r], sizeof low[r]);
      std::memcpy(out + r * out_stride + 16, &high[r], sizeof high[r]);
    } else {
      float sums[PANEL];
      std::memcpy(sums, &low[r], sizeof low[r]);
      std::memcpy(sums + 16, &high[r], sizeof high[r]);
      std::memcpy(out + r * out_stride, sums, valid * sizeof(float));
    }
  }
}

// All `rows` input rows against one panel: blocks of PANEL_ROWS, then the rest as one block. With more
// than one block, the first two prefetch the next panel (`next`), half of its 2n cache lines each, one
// line per input: the next panel's first pass then reads from cache, and the stream from memory is
// spread over the arithmetic of both passes instead of stalling the first (16 rows: the 32000 x 512
// head 1.85 -> ~1.25 ms, 2816 x 512 170 -> ~110 us, 2 threads, weights cold; 64 rows 15% faster).
// (Tried and dropped: passes of even size, 9 rows as 5 + 4, no faster in an A/B of the builds;
// prefetching the whole next panel during the later passes only, 16-request `qwen2-small` decoding 6%
// slower; 16 rows as one pass per half panel, 16 vectors of sums over x transposed, slower than two
// 8-row passes: 16 broadcasts per 16 FMAs against 8.)
template <int ROWS = PANEL_ROWS, typename T = float>
void panel_rows(const T* panel, int64_t n, const float* xs, int64_t rows, float* out, int64_t out_stride,
                int64_t valid, const T* next = nullptr) {
  if constexpr (ROWS == PANEL_ROWS) {
    // The half of the next panel's lines the pass starting at row r prefetches (none past the second).
    auto lines = [&](int64_t r) -> const T* {  // fp32 lines; other types none
      return std::is_same_v<T, float> && next != nullptr && rows > PANEL_ROWS && r < 2 * PANEL_ROWS ? next + r / PANEL_ROWS * n * 16 : nullptr;
    };
    int64_t r = 0;
    for (; r + PANEL_ROWS <= rows; r += PANEL_ROWS)
      panel_block<PANEL_ROWS, T>(panel, n, xs + r * n, n, out + r * out_stride, out_stride, valid, lines(r));
    if (r < rows)
      panel_rows<PANEL_ROWS - 1, T>(panel, n, xs + r * n, rows - r, out + r * out_stride, out_stride, valid, lines(r));
  } else if constexpr (ROWS > 0) {
    if (rows == ROWS) return panel_block<ROWS, T>(panel, n, xs, n, out, out_stride, valid, next);
    panel_rows<ROWS - 1, T>(panel, n, xs, rows, out, out_stride, valid, next);
  }
}

// Every used expert's [rows][n] matrix times its run of vectors: runs[u] = (matrix, scale, first vector, count)
// over xs [vectors][n] -> out [vectors][rows]. The rows of all used matrices are split over torch's
// threads as one range, so both threads stream (different) weights.
template <typename T>
struct ExpertRun {
  const T* matrix;
  const float* scale;  // int8 matrices: a scale per row (the product is sum * scale); else nullptr
  int64_t first, count;
};

template <typename T>
void expert_products(const std::vector<ExpertRun<T>>& runs, const float* xs, int64_t n, int64_t rows, float* out) {
  const int64_t total = static_cast<int64_t>(runs.size()) * rows;
  // Chunks of at least 64k weights: a nano model's two experts (2 x 37k) stay on one thread, where
  // waking the second would cost more than it saves.
  const int64_t grain = std::max<int64_t>(MATRIX_ROWS * 16, (1 << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t at = begin; at < end;) {
      const ExpertRun<T>& run = runs[at / rows];
      const int64_t from = at % rows, to = std::min(rows, from + (end - at));
      matrix_vectors(run.matrix, run.scale, n, xs + run.first * n, run.count, from, to, out + run.first * rows, rows);
      at += to - from;
    }
  });
}

// scores[v][k] = keys[k] . queries[v] for 4 key rows (pointers, each n values of T, read in place)
// and VECTORS fp32 query rows [VECTORS][n]: 4 x VECTORS sums in registers, summed across lanes four
// keys at a time.
template <int VECTORS, typename T>
void key_scores_block(const T* const* keys, const float* queries, int64_t n, float* scores, int64_t score_stride) {
  constexpr int KEYS = 4;
  const int64_t whole = n / 16 * 16;
  Vector16 sums[KEYS][VECTORS] = {};
  for (int64_t i = 0; i < whole; i += 16) {
    Vector16 key[KEYS];
    for (int k = 0; k < KEYS; ++k) key[k] = load16(keys[k] + i);
    for (int v = 0; v < VECTORS; ++v) {
      Vector16 q = load16(queries + v * n + i);
#if defined(__x86_64__) && defined(__AVX512F__)
      asm("" : "+v"(q));  // held in a register (as in product_block)
#endif
      for (int k = 0; k < KEYS; ++k) sums[k][v] += key[k] * q;
    }
  }
  if (whole < n) {  // the partial last vector, zero-filled
    Vector16 key[KEYS];
    for (int k = 0; k < KEYS; ++k) key[k] = load16_tail(keys[k] + whole, n - whole);
    for (int v = 0; v < VECTORS; ++v) {
      const Vector16 q = load16_tail(queries + v * n + whole, n - whole);
      for (int k = 0; k < KEYS; ++k) sums[k][v] += key[k] * q;
    }
  }
  for (int v = 0; v < VECTORS; ++v) {
#ifdef NANOSEEK_SHUFFLEVECTOR
    const Vector4 four = lane_sums4(sums[0][v], sums[1][v], sums[2][v], sums[3][v]);
    for (int k = 0; k < KEYS; ++k) scores[v * score_stride + k] = four[k];
#else
    for (int k = 0; k < KEYS; ++k) scores[v * score_stride + k] = lane_sum(sums[k][v]);
#endif
  }
}

// scores [vectors][score_stride] for `count` keys (pointers) against fp32 query rows [vectors][n],
// in blocks of 4 keys: score_stride >= count rounded up to 4, the keys past `count` being `zeros`
// (n values of T). Rows PREFETCH_ROWS_AHEAD keys ahead are requested while a block is scored.
template <typename T>
void key_scores(const T* const* keys, int64_t count, const T* zeros, const float* queries, int64_t vectors, int64_t n,
                float* scores, int64_t score_stride) {
  for (int64_t t = 0; t < count; t += 4) {
    const T* block[4];
    for (int k = 0; k < 4; ++k) {
      block[k] = t + k < count ? keys[t + k] : zeros;
      if (t + k + PREFETCH_ROWS_AHEAD < count) prefetch(keys[t + k + PREFETCH_ROWS_AHEAD], n);
    }
    int64_t v = 0;
    for (; v + 4 <= vectors; v += 4) key_scores_block<4>(block, queries + v * n, n, scores + v * score_stride + t, score_stride);
    const float* rest = queries + v * n;
    float* rest_scores = scores + v * score_stride + t;
    switch (vectors - v) {  // a group of 2 or 3 query rows (GQA with 2 or 3 heads a KV head) in one block
      case 3: key_scores_block<3>(block, rest, n, rest_scores, score_stride); break;
      case 2: key_scores_block<2>(block, rest, n, rest_scores, score_stride); break;
      case 1: key_scores_block<1>(block, rest, n, rest_scores, score_stride); break;
    }
  }
}

// out[r][from:...] = sum_t p[r * p_stride + t] * values[t][from:...] for R rows of weights over `count`
// value rows (pointers, read in place): CHUNKS whole vectors of outputs from `from`, then with TAIL the
// partial last one (n - from - 16 * CHUNKS values, zero-filled loads), all R rows' sums in registers so
// each value row is loaded once for them.
template <int R, int CHUNKS, bool TAIL, typename T>
void weighted_sums_block(const float* p, int64_t p_stride, const T* const* values, int64_t from, int64_t n,
                         int64_t count, float* out, int64_t out_stride) {
  constexpr int VECTORS = CHUNKS + (TAIL ? 1 : 0);
  const int64_t tail = n - from - 16 * CHUNKS;
  Vector16 sums[R][VECTORS] = {};
  for (int64_t t = 0; t < count; ++t) {
    if (from == 0 && t + PREFETCH_ROWS_AHEAD < count) prefetch(values[t + PREFETCH_ROWS_AHEAD], n);
    Vector16 row[VECTORS];
    for (int c = 0; c < CHUNKS; ++c) row[c] = load16(values[t] + from + 16 * c);
    if constexpr (TAIL) row[CHUNKS] = load16_tail(values[t] + from + 16 * CHUNKS, tail);
    for (int r = 0; r < R; ++r) {
      const float weight = p[r * p_stride + t];
      for (int c = 0; c < VECTORS; ++c) sums[r][c] += weight * row[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + r * out_stride + from;
    for (int c = 0; c < CHUNKS; ++c) store16(o + 16 * c, sums[r][c]);
    if constexpr (TAIL) store16_tail(o + 16 * CHUNKS, sums[r][CHUNKS], tail);  // no memcpy of a variable size:
                                                                                 // it keeps the sums on the stack
  }
}

// out[r][0:n] = sum_t p[r * p_stride + t] * values[t][0:n] for R rows of weights (a softmax's
// probabilities) over `count` value rows: 64 outputs at a time, then the rest (a head dim of 24: one
// whole and one partial vector) in one more pass.
template <int R, typename T>
void weighted_sums(const float* p, int64_t p_stride, const T* const* values, int64_t n, int64_t count, float* out,
                   int64_t out_stride) {
  int64_t from = 0;
  for (; n - from >= 64; from += 64) weighted_sums_block<R, 4, false>(p, p_stride, values, from, n, count, out, out_stride);
  const int64_t rest = n - from;
  switch (rest / 16 * 2 + (rest % 16 != 0)) {
    case 1: weighted_sums_block<R, 0, true>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 2: weighted_sums_block<R, 1, false>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 3: weighted_sums_block<R, 1, true>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 4: weighted_sums_block<R, 2, false>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 5: weighted_sums_block<R, 2, true>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 6: weighted_sums_block<R, 3, false>(p, p_stride, values, from, n, count, out, out_stride); break;
    case 7: weighted_sums_block<R, 3, true>(p, p_stride, values, from, n, count, out, out_stride); break;
  }
}

template <typename T>
void weighted_sums_any(const float* p, int64_t p_stride, const T* const* values, int64_t n, int64_t count, int64_t rows,
                       float* out, int64_t out_stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) weighted_sums<4>(p + r * p_stride, p_stride, values, n, count, out + r * out_stride, out_stride);
  const float* rest = p + r * p_stride;
  float* rest_out = out + r * out_stride;
  switch (rows - r) {  // 2 or 3 rows in one pass: each value row loaded once for them
    case 3: weighted_sums<3>(rest, p_stride, values, n, count, rest_out, out_stride); break;
    case 2: weighted_sums<2>(rest, p_stride, values, n, count, rest_out, out_stride); break;
    case 1: weighted_sums<1>(rest, p_stride, values, n, count, rest_out, out_stride); break;
  }
}

// ----- causal self-attention for training: fp32, forward and backward --------------------------------
// Per (sequence, KV head) and document, the keys its rows see (a shared prefix, then its own) are
// gathered transposed, [dim][keys] with 16 keys a vector, so that a query row's scores are sums of its
// values broadcast against 16 keys at once: no lane sums and no partial vectors for head dims like 24 or
// 48. Query rows go ATTENTION_ROWS at a time: a few positions times the query heads that share the KV
// head (they see the same keys), each key vector loaded once for all of them. Within a document a row
// sees the gathered keys up to its own position: the causal limit is the only mask. A row's
// probabilities never leave L1; the backward recomputes them from the saved log-sum-exp, as flash
// attention does.
constexpr int ATTENTION_ROWS = 8;
constexpr int GRADIENT_ROWS = 16;  // the backward's blocks: two scoring blocks, then one update of dK and dV


inline Vector16 max16(const Vector16& a, const Vector16& b) {
#if defined(__AVX512F__)
  return as_vector16(_mm512_max_ps(as_m512(a), as_m512(b)));
#else
  Vector16 v;
  for (int l = 0; l < 16; ++l) v[l] = std::max(a[l], b[l]);
  return v;
#endif
}

// vector_exp on 16 lanes (the same reduction and polynomial): e^-inf = 0.
inline Vector16 exp16(const Vector16& x) {
#if defined(__AVX512F__)
  const __m512 v = as_m512(x);
  const __mmask16 underflow = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vector16 nn = as_vector16(n);
  const Vector16 r = (as_vector16(clamped) - nn * 0.693145751953125f) - nn * 1.428606765330187045e-06f;
  const Vector16 p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return as_vector16(_mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), as_m512(p), _mm512_castsi512_ps(bits)));
#else
  Vector16 out;
  for (int l = 0; l < 16; ++l) out[l] = vector_exp(x[l]);
  return out;
#endif
}

inline float lane_max(const Vector16& v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(as_m512(v));
#else
  float m = v[0];
  for (int l = 1; l < 16; ++l) m = std::max(m, v[l]);
  return m;
#endif
}


// out[r][0:16 * chunks] = scale * rows[r][0:n] @ columns[0:n][0:16 * chunks] for ATTENTION_ROWS rows
// (pointers) and a [n][stride] matrix: two 16-column chunks of every row in registers at a time.
void row_block_products(const float* const* rows, const float* columns, int64_t stride, int64_t n, int64_t chunks,
                        float scale, float* out, int64_t out_stride) {
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    Vector16 sums[ATTENTION_ROWS][2] = {};
    const float* column = columns + c * 16;
    for (int64_t d = 0; d < n; ++d) {
      const Vector16 first = load16f(column + d * stride), second = load16f(column + d * stride + 16);
      for (int r = 0; r < ATTENTION_ROWS; ++r) {
        const float x = rows[r][d];
        sums[r][0] += x * first;
        sums[r][1] += x * second;
      }
    }
    for (int r = 0; r < ATTENTION_ROWS; ++r) {
      store16(out + r * out_stride + c * 16, sums[r][0] * scale);
      store16(out + r * out_stride + c * 16 + 16, sums[r][1] * scale);
    }
  }
  if (c < chunks) {
    Vector16 sums[ATTENTION_ROWS] = {};
    const float* column = columns + c * 16;
    for (int64_t d = 0; d < n; ++d) {
      const Vector16 first = load16f(column + d * stride);
      for (int r = 0; r < ATTENTION_ROWS; ++r) sums[r] += rows[r][d] * first;
    }
    for (int r = 0; r < ATTENTION_ROWS; ++r) store16(out + r * out_stride + c * 16, sums[r] * scale);
  }
}

// columns[d][0:16 * chunks] += sum_r rows_t[d][r] * block[r][0:16 * chunks] for GRADIENT_ROWS rows
// (the transposed update of a key or value gradient from a block of query rows, rows_t being the block's
// [n][GRADIENT_ROWS] values): each 16-column chunk of the block stays in registers while the columns
// pass once.
void accumulate_row_block(const float* rows_t, const float* block, int64_t block_stride, int64_t n,
                          int64_t chunks, float* columns, int64_t stride) {
  for (int64_t c = 0; c < chunks; ++c) {
    Vector16 b[GRADIENT_ROWS];
    for (int r = 0; r < GRADIENT_ROWS; ++r) b[r] = load16f(block + r * block_stride + c * 16);
    float* column = columns + c * 16;
    for (int64_t d = 0; d < n; ++d) {
      Vector16 even = load16f(column + d * stride), odd = {};
      for (int r = 0; r < GRADIENT_ROWS; r += 2) {
        even += rows_t[d * GRADIENT_ROWS + r] * b[r];
        odd += rows_t[d * GRADIENT_ROWS + r + 1] * b[r + 1];
      }
      store16(column + d * stride, even + odd);
    }
  }
}

// The sum over 0:n of a * b, n >= 1.
inline float dot(const float* a, const float* b, int64_t n) {
  Vector16 sum = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) sum += load16f(a + i) * load16f(b + i);
  if (i < n) sum += load16_tail(a + i, n - i) * load16_tail(b + i, n - i);
  return lane_sum(sum);
}

// out[r][from:from + 16 * CHUNKS] (clipped to n) = sum_j p[r][j] * rows[j][...] for ATTENTION_ROWS rows of
// weights over `count` rows (pointers, n values each): every sum in registers, the last chunk of a
// row whose length is not a multiple of 16 loaded and stored partially.
template <int CHUNKS>
void block_weighted_sums(const float* p, int64_t p_stride, const float* const* rows, int64_t from, int64_t n,
                         int64_t count, float* out, int64_t out_stride) {
  Vector16 sums[ATTENTION_ROWS][CHUNKS] = {};
  const int64_t last = std::min<int64_t>(16, n - from - 16 * (CHUNKS - 1));  // values in the last chunk
  for (int64_t j = 0; j < count; ++j) {
    const float* row = rows[j] + from;
    Vector16 x[CHUNKS];
    for (int c = 0; c < CHUNKS - 1; ++c) x[c] = load16f(row + 16 * c);
    x[CHUNKS - 1] = last == 16 ? load16f(row + 16 * (CHUNKS - 1)) : load16_tail(row + 16 * (CHUNKS - 1), last);
    for (int r = 0; r < ATTENTION_ROWS; ++r) {
      const float w = p[r * p_stride + j];
      for (int c = 0; c < CHUNKS; ++c) sums[r][c] += w * x[c];
    }
  }
  for (int r = 0; r < ATTENTION_ROWS; ++r) {
    float* o = out + r * out_stride + from;
    for (int c = 0; c < CHUNKS - 1; ++c) store16(o + 16 * c, sums[r][c]);
    store16_tail(o + 16 * (CHUNKS - 1), sums[r][CHUNKS - 1], last);
  }
}

// out[r][0:n] = sum_j p[r][j] * rows[j][0:n] for ATTENTION_ROWS rows (out has ATTENTION_ROWS rows), 32
// values of every row at a time (16 sums in registers).
void row_block_weighted_sums(const float* p, int64_t p_stride, const float* const* rows, int64_t n, int64_t count,
                             float* out, int64_t out_stride) {
  int64_t from = 0;
  for (; n - from > 16; from += 32) block_weighted_sums<2>(p, p_stride, rows, from, n, count, out, out_stride);
  if (from < n) block_weighted_sums<1>(p, p_stride, rows, from, n, count, out, out_stride);
}

// out[d][r] = rows[r][d] for the GRADIENT_ROWS rows (pointers) of a block, d < n: one gather per d where
// AVX-512 has them and the rows lie within 2^31 floats of the first.
void transpose_row_block(const float* const* rows, int64_t n, float* out) {
#if defined(__AVX512F__)
  alignas(64) int32_t offsets[GRADIENT_ROWS];
  bool near = true;
  for (int r = 0; r < GRADIENT_ROWS; ++r) {
    const int64_t offset = rows[r] - rows[0];
    near = near && offset > -(int64_t{1} << 31) && offset + n < (int64_t{1} << 31);
    offsets[r] = static_cast<int32_t>(offset);
  }
  if (near) {
    const __m512i index = _mm512_load_si512(offsets);
    for (int64_t d = 0; d < n; ++d) _mm512_storeu_ps(out + d * GRADIENT_ROWS, _mm512_i32gather_ps(index, rows[0] + d, 4));
    return;
  }
#endif
  for (int r = 0; r < GRADIENT_ROWS; ++r)
    for (int64_t d = 0; d < n; ++d) out[d * GRADIENT_ROWS + r] = rows[r][d];
}


// ----- causal self-attention for training (fp32): see row_block_products -------------------------------
struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, dim, value_dim;
};

AttentionShape attention_shape(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const char* name) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": query, key, value must be [batch, seq, heads, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, name,
              ": fp32 only");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && v.size(2) == k.size(2) && q.size(2) % k.size(2) == 0,
              name, ": keys and values must match the query's batch and length, with heads a multiple of KV heads");
  for (const auto* t : {&q, &k, &v}) TORCH_CHECK(t->stride(-1) == 1, name, ": last dimensions must be contiguous");
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

// One document of a sequence: positions [begin, end), which see the keys from begin up to their own and
// those in [prefix_begin, prefix_end), an earlier document they share (GRPO's completions of one prompt
// each see the prompt, stored once). Plain causal attention is one document without a prefix.
struct Document {
  int64_t begin, end, prefix_begin = 0, prefix_end = 0;
  int64_t keys() const { return prefix_end - prefix_begin + end - begin; }  // the most a row sees
};

// The documents of every sequence from the optional [b, s] starts (each position's document's first
// position: runs) and [b, s, 2] prefix ranges (the same for all positions of a document, clipped to end
// by the document's start); checked.
std::vector<std::vector<Document>> sequence_documents(const c10::optional<torch::Tensor>& starts,
                                                      const c10::optional<torch::Tensor>& prefix, int64_t batch,
                                                      int64_t seq, const char* name) {
  std::vector<std::vector<Document>> documents(batch);
  if (!starts.has_value()) {
    TORCH_CHECK(!prefix.has_value(), name, ": prefix ranges need starts");
    for (auto& sequence : documents) sequence.push_back({0, seq});
    return documents;
  }
  TORCH_CHECK(starts->scalar_type() == at::kLong && starts->is_contiguous() && starts->dim() == 2 &&
                  starts->size(0) == batch && starts->size(1) == seq,
              name, ": starts must be contiguous int64 [batch, seq]");
  if (prefix.has_value())
    TORCH_CHECK(prefix->scalar_type() == at::kLong && prefix->is_contiguous() && prefix->dim() == 3 &&
                    prefix->size(0) == batch && prefix->size(1) == seq && prefix->size(2) == 2,
                name, ": prefix must be contiguous int64 [batch, seq, 2]");
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* first = starts->data_ptr<int64_t>() + b * seq;
    const int64_t* ranges = prefix.has_value() ? prefix->data_ptr<int64_t>() + b * seq * 2 : nullptr;
    for (int64_t i = 0; i < seq; ++i) {
      const bool begins = first[i] == i;
      TORCH_CHECK(begins || (i > 0 && first[i] == first[i - 1]), name,
                  ": starts must give each position its document's first position (documents in runs)");
      int64_t prefix_begin = 0, prefix_end = 0;
      if (ranges != nullptr && ranges[2 * i] < ranges[2 * i + 1]) {
        prefix_end = std::max<int64_t>(0, std::min(ranges[2 * i + 1], first[i]));
        prefix_begin = std::max<int64_t>(0, std::min(ranges[2 * i], prefix_end));
      }
      if (begins) {
        documents[b].push_back({i, i + 1, prefix_begin, prefix_end});
      } else {
        Document& document = documents[b].back();
        TORCH_CHECK(document.prefix_begin == prefix_begin && document.prefix_end == prefix_end, name,
                    ": every position of a document must see the same prefix range");
        document.end = i + 1;
      }
    }
  }
  return documents;
}

// The most keys any row sees, rounded up to whole 16-key chunks.
int64_t padded_keys(const std::vector<std::vector<Document>>& documents) {
  int64_t most = 1;
  for (const auto& sequence : documents)
    for (const Document& document : sequence) most = std::max(most, document.keys());
  return (most + 15) / 16 * 16;
}

// A document's keys (its prefix rows, then its own), as row pointers and, if `columns` is given,
// transposed into [dim][padded] columns, zero from the last key to the chunk's end.
void gather_keys(const float* base, int64_t row_stride, const Document& document, int64_t dim, int64_t padded,
                 const float** rows, float* columns) {
  const int64_t prefix = document.prefix_end - document.prefix_begin, count = document.keys();
  for (int64_t j = 0; j < count; ++j)
    rows[j] = base + (j < prefix ? document.prefix_begin + j : document.begin + j - prefix) * row_stride;
  if (columns == nullptr) return;
  const int64_t end = (count + 15) / 16 * 16;
  for (int64_t d = 0; d < dim; ++d) std::fill(columns + d * padded + count, columns + d * padded + end, 0.f);
  for (int64_t j = 0; j < count; ++j)
    for (int64_t d = 0; d < dim; ++d) columns[d * padded + j] = rows[j][d];
}

// The query rows of one scoring block: `positions` positions from `first` times the heads
// [head, head + heads), position-major, padded to ATTENTION_ROWS with the last real row; limit[r] is
// how many of the document's gathered keys row r sees (0 for padding); `count` real rows (0 past the
// document's end, the rows then pointing at its last position).
struct RowBlock {
  const float* rows[ATTENTION_ROWS];
  int64_t position[ATTENTION_ROWS], head[ATTENTION_ROWS], limit[ATTENTION_ROWS];
  int count = 0;
  int64_t keys = 0;  // the most keys a row of the block sees
};

RowBlock row_block(const float* base, int64_t position_stride, int64_t head_stride, const Document& document,
                   int64_t first, int64_t positions, int64_t head, int64_t heads) {
  RowBlock block;
  const int64_t prefix = document.prefix_end - document.prefix_begin;
  positions = std::max<int64_t>(0, std::min(positions, document.end - first));
  block.count = static_cast<int>(positions * heads);
  for (int r = 0; r < ATTENTION_ROWS; ++r) {
    const int real = std::min(r, std::max(block.count - 1, 0));  // none past the document: its last row
    block.position[r] = block.count > 0 ? first + real / heads : document.end - 1;
    block.head[r] = head + real % heads;
    block.rows[r] = base + block.position[r] * position_stride + block.head[r] * head_stride;
    block.limit[r] = r < block.count ? prefix + block.position[r] - document.begin + 1 : 0;
    block.keys = std::max(block.keys, block.limit[r]);
  }
  return block;
}

// How a KV head's query heads split into blocks: up to ATTENTION_ROWS heads at a time, with as many
// positions as fill the block's rows.
struct HeadBlocks {
  int64_t heads, positions;
};

HeadBlocks head_blocks(int64_t group) {
  const int64_t heads = std::min<int64_t>(group, ATTENTION_ROWS);
  return {heads, std::max<int64_t>(1, ATTENTION_ROWS / heads)};
}

// softmax(scale * q k^T, causal) v over q [b, s, h, d], k [b, s, kv_heads, d], v [b, s, kv_heads, dv] (any
// strides, last dimensions contiguous): (out [b, s, h, dv], log-sum-exp of the scaled scores [b, h, s]).
// With `starts` [b, s] (packed documents), position i sees keys starts[i]..i only, and with `prefix`
// [b, s, 2] also those in [prefix[i][0], prefix[i][1]) (see Document). The work goes with the documents'
// lengths: a block of rows scores only its document's gathered keys, up to its last row's position.
std::vector<torch::Tensor> causal_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, double scale_,
                                                    const c10::optional<torch::Tensor>& starts,
                                                    const c10::optional<torch::Tensor>& prefix) {
  const auto shape = attention_shape(q, k, v, "causal_attention_forward");
  const int64_t B = shape.batch, T = shape.seq, H = shape.heads, KVH = shape.kv_heads, D = shape.dim,
                DV = shape.value_dim, G = H / KVH;
  const auto documents = sequence_documents(starts, prefix, B, T, "causal_attention_forward");
  const int64_t KP = padded_keys(documents);
  const HeadBlocks split = head_blocks(G);
  const float scale = static_cast<float>(scale_);
  auto out = torch::empty({B, T, H, DV}, q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = torch::empty({B, H, T}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  float *od = out.data_ptr<float>(), *ld = lse.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> keys_t(new float[D * KP]), scores(new float[ATTENTION_ROWS * KP]),
        mixed(new float[ATTENTION_ROWS * DV]);
    std::vector<const float*> key_rows(KP), value_rows(KP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH;
      for (const Document& document : documents[b]) {
        gather_keys(kd + b * k.stride(0) + g * k.stride(2), k.stride(1), document, D, KP, key_rows.data(), keys_t.get());
        gather_keys(vd + b * v.stride(0) + g * v.stride(2), v.stride(1), document, DV, KP, value_rows.data(), nullptr);
        for (int64_t head = g * G; head < (g + 1) * G; head += split.heads) {
          const int64_t heads = std::min(split.heads, (g + 1) * G - head);
          for (int64_t first = document.begin; first < document.end; first += split.positions) {
            const RowBlock block = row_block(qd + b * q.stride(0), q.stride(1), q.stride(2), document, first,
                                             split.positions, head, heads);
            const int64_t chunks = (block.keys + 15) / 16;
            row_block_products(block.rows, keys_t.get(), KP, D, chunks, scale, scores.get(), KP);
            // the softmax of all the block's rows at once (padding rows too, never stored): one row's
            // maximum and sum are chains of dependent operations, eight of them overlap
            for (int r = 0; r < block.count; ++r)
              std::fill(scores.get() + r * KP + block.limit[r], scores.get() + r * KP + chunks * 16,
                        -std::numeric_limits<float>::infinity());
            Vector16 peaks[ATTENTION_ROWS], totals[ATTENTION_ROWS];
            for (int r = 0; r < ATTENTION_ROWS; ++r) peaks[r] = load16f(scores.get() + r * KP), totals[r] = Vector16{};
            for (int64_t c = 1; c < chunks; ++c)
              for (int r = 0; r < ATTENTION_ROWS; ++r) peaks[r] = max16(peaks[r], load16f(scores.get() + r * KP + c * 16));
            float peak[ATTENTION_ROWS], inverse[ATTENTION_ROWS];
            for (int r = 0; r < ATTENTION_ROWS; ++r) peak[r] = lane_max(peaks[r]);
            for (int64_t c = 0; c < chunks; ++c)
              for (int r = 0; r < ATTENTION_ROWS; ++r) {
                float* s = scores.get() + r * KP + c * 16;
                const Vector16 e = exp16(load16f(s) - peak[r]);
                store16(s, e);
                totals[r] += e;
              }
            for (int r = 0; r < block.count; ++r) {
              const float sum = lane_sum(totals[r]);
              inverse[r] = 1.f / sum;
              ld[(b * H + block.head[r]) * T + block.position[r]] = peak[r] + std::log(sum);
            }
            row_block_weighted_sums(scores.get(), KP, value_rows.data(), DV, block.keys, mixed.get(), DV);
            for (int r = 0; r < block.count; ++r) {
              float* o = od + ((b * T + block.position[r]) * H + block.head[r]) * DV;
              for (int64_t e = 0; e < DV; ++e) o[e] = mixed[r * DV + e] * inverse[r];
            }
          }
        }
      }
    }
  });
  return {out, lse};
}

// Gradients (dq, dk, dv) of causal_attention_forward's output, given its inputs, output, log-sum-exp and
// the output's gradient (any strides, last dimension contiguous). Per document, GRADIENT_ROWS query rows
// at a time (two scoring blocks): their probabilities and score gradients give dQ row by row and, for
// all of them at once, the updates of the document's gathered dK and dV, added to the keys' rows after.
std::vector<torch::Tensor> causal_attention_backward(const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v, const torch::Tensor& out,
                                                     const torch::Tensor& lse, const torch::Tensor& grad_out_,
                                                     double scale_, const c10::optional<torch::Tensor>& starts,
                                                     const c10::optional<torch::Tensor>& prefix) {
  static_assert(GRADIENT_ROWS == 2 * ATTENTION_ROWS, "a gradient block is two scoring blocks");
  const auto shape = attention_shape(q, k, v, "causal_attention_backward");
  const int64_t B = shape.batch, T = shape.seq, H = shape.heads, KVH = shape.kv_heads, D = shape.dim,
                DV = shape.value_dim, G = H / KVH;
  const auto documents = sequence_documents(starts, prefix, B, T, "causal_attention_backward");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == grad_out_.sizes() && out.size(3) == DV && lse.is_contiguous() &&
                  lse.size(2) == T && lse.scalar_type() == at::kFloat && grad_out_.scalar_type() == at::kFloat,
              "causal_attention_backward: out and lse as the forward returned them, grad_out shaped like out");
  const int64_t KP = padded_keys(documents);
  const HeadBlocks split = head_blocks(G);
  const auto grad_out = grad_out_.stride(-1) == 1 ? grad_out_ : grad_out_.contiguous();
  const float scale = static_cast<float>(scale_);
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto dq = torch::empty({B, T, H, D}, contiguous);
  auto dk = torch::zeros({B, T, KVH, D}, contiguous);
  auto dv = torch::zeros({B, T, KVH, DV}, contiguous);
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>(),
              *od = out.data_ptr<float>(), *ld = lse.data_ptr<float>(), *gd = grad_out.data_ptr<float>();
  float *dqd = dq.data_ptr<float>(), *dkd = dk.data_ptr<float>(), *dvd = dv.data_ptr<float>();
  // dO . O = sum_j P dP for every row, in one pass over both
  std::vector<float> deltas(B * T * H);
  at::parallel_for(0, B * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t h = 0; h < H; ++h)
        deltas[row * H + h] = dot(gd + (row / T) * grad_out.stride(0) + (row % T) * grad_out.stride(1) + h * grad_out.stride(2),
                                  od + (row * H + h) * DV, DV);
  });
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> keys_t(new float[D * KP]), values_t(new float[DV * KP]), dkeys_t(new float[D * KP]),
        dvalues_t(new float[DV * KP]), probs(new float[GRADIENT_ROWS * KP]), dscores(new float[GRADIENT_ROWS * KP]),
        dquery(new float[ATTENTION_ROWS * D]), q_block_t(new float[D * GRADIENT_ROWS]),
        g_block_t(new float[DV * GRADIENT_ROWS]);
    std::vector<const float*> key_rows(KP), value_rows(KP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH;
      for (const Document& document : documents[b]) {
        const int64_t count = document.keys(), padded = (count + 15) / 16 * 16;
        gather_keys(kd + b * k.stride(0) + g * k.stride(2), k.stride(1), document, D, KP, key_rows.data(), keys_t.get());
        gather_keys(vd + b * v.stride(0) + g * v.stride(2), v.stride(1), document, DV, KP, value_rows.data(), values_t.get());
        for (int64_t d = 0; d < D; ++d) std::fill(dkeys_t.get() + d * KP, dkeys_t.get() + d * KP + padded, 0.f);
        for (int64_t e = 0; e < DV; ++e) std::fill(dvalues_t.get() + e * KP, dvalues_t.get() + e * KP + padded, 0.f);
        for (int64_t head = g * G; head < (g + 1) * G; head += split.heads) {
          const int64_t heads = std::min(split.heads, (g + 1) * G - head);
          for (int64_t first = document.begin; first < document.end; first += 2 * split.positions) {
            const RowBlock blocks[2] = {
                row_block(qd + b * q.stride(0), q.stride(1), q.stride(2), document, first, split.positions, head, heads),
                row_block(qd + b * q.stride(0), q.stride(1), q.stride(2), document, first + split.positions,
                          split.positions, head, heads)};
            const int64_t chunks = (std::max(blocks[0].keys, blocks[1].keys) + 15) / 16;  // of both blocks
            const float* g_rows[GRADIENT_ROWS];
            for (int half = 0; half < 2; ++half) {
              const RowBlock& block = blocks[half];
              float* p = probs.get() + half * ATTENTION_ROWS * KP;
              float* ds = dscores.get() + half * ATTENTION_ROWS * KP;
              const float** g_part = g_rows + half * ATTENTION_ROWS;
              for (int r = 0; r < ATTENTION_ROWS; ++r)
                g_part[r] = gd + b * grad_out.stride(0) + block.position[r] * grad_out.stride(1) +
                            block.head[r] * grad_out.stride(2);
              if (block.count == 0) {  // past the document's end: no probabilities, no gradient
                std::fill(p, p + ATTENTION_ROWS * KP, 0.f);
                std::fill(ds, ds + ATTENTION_ROWS * KP, 0.f);
                continue;
              }
              const int64_t own = (block.keys + 15) / 16;
              row_block_products(block.rows, keys_t.get(), KP, D, own, scale, p, KP);        // scores
              row_block_products(g_part, values_t.get(), KP, DV, own, 1.f, ds, KP);          // dP = dO v^T
              for (int r = 0; r < ATTENTION_ROWS; ++r) {
                float* pr = p + r * KP;
                float* dsr = ds + r * KP;
                const int64_t limit = block.limit[r];
                if (r >= block.count) {  // a padding row
                  std::fill(pr, pr + chunks * 16, 0.f);
                  std::fill(dsr, dsr + chunks * 16, 0.f);
                  continue;
                }
                const int64_t i = block.position[r], h = block.head[r];
                const float delta = deltas[(b * T + i) * H + h], m = ld[(b * H + h) * T + i];
                for (int64_t c = 0; c < (limit + 15) / 16; ++c) {  // keys past the limit: cleared below
                  const Vector16 prob = exp16(load16f(pr + c * 16) - m);
                  store16(pr + c * 16, prob);
                  store16(dsr + c * 16, prob * (load16f(dsr + c * 16) - delta) * scale);
                }
                std::fill(pr + limit, pr + chunks * 16, 0.f);
                std::fill(dsr + limit, dsr + chunks * 16, 0.f);
              }
              row_block_weighted_sums(ds, KP, key_rows.data(), D, block.keys, dquery.get(), D);  // dQ = dS k
              for (int r = 0; r < block.count; ++r)
                std::copy(dquery.get() + r * D, dquery.get() + (r + 1) * D,
                          dqd + ((b * T + block.position[r]) * H + block.head[r]) * D);
            }
            const float* q_rows[GRADIENT_ROWS];
            for (int r = 0; r < GRADIENT_ROWS; ++r) q_rows[r] = blocks[r / ATTENTION_ROWS].rows[r % ATTENTION_ROWS];
            transpose_row_block(q_rows, D, q_block_t.get());
            transpose_row_block(g_rows, DV, g_block_t.get());
            // dK^T += q^T dS, dV^T += dO^T P
            accumulate_row_block(q_block_t.get(), dscores.get(), KP, D, chunks, dkeys_t.get(), KP);
            accumulate_row_block(g_block_t.get(), probs.get(), KP, DV, chunks, dvalues_t.get(), KP);
          }
        }
        const int64_t prefix = document.prefix_end - document.prefix_begin;
        for (int64_t j = 0; j < count; ++j) {
          const int64_t row = j < prefix ? document.prefix_begin + j : document.begin + j - prefix;
          float* dk_row = dkd + ((b * T + row) * KVH + g) * D;
          float* dv_row = dvd + ((b * T + row) * KVH + g) * DV;
          for (int64_t d = 0; d < D; ++d) dk_row[d] += dkeys_t[d * KP + j];
          for (int64_t e = 0; e < DV; ++e) dv_row[e] += dvalues_t[e * KP + j];
        }
      }
    }
  });
  return {dq, dk, dv};
}

// ----- per-token log-probs of an output head's logits (GRPO's update) ----------------------------------
// Row by row, while the row is in L1: with z = logits / temperature, the target's log softmax(z), the
// entropy log Z - sum(e^(z - max) (z - max)) / sum(e^(z - max)) and, if asked, d logp / d logits =
// (onehot(target) - softmax(z)) / temperature written over the logits.
std::vector<torch::Tensor> token_logprobs(torch::Tensor logits, const torch::Tensor& targets, double temperature,
                                          bool with_entropy, bool gradient) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.size(1) > 0,
              "token_logprobs: logits must be contiguous fp32 [tokens, vocab]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "token_logprobs: targets must be int64 [tokens]");
  TORCH_CHECK(temperature > 0, "token_logprobs: temperature must be positive");
  const int64_t rows = logits.size(0), vocab = logits.size(1), whole = vocab / 16 * 16;
  const auto target = targets.contiguous();
  const int64_t* target_data = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(target_data[r] >= 0 && target_data[r] < vocab, "token_logprobs: target out of range");
  auto logprobs = torch::empty({rows}, logits.options());
  auto entropy = torch::empty({with_entropy ? rows : 0}, logits.options());
  float *data = logits.data_ptr<float>(), *logprob_data = logprobs.data_ptr<float>(),
        *entropy_data = with_entropy ? entropy.data_ptr<float>() : nullptr;
  const float inverse_t = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = data + r * vocab;
      const int64_t t = target_data[r];
      const float target_logit = z[t];  // before the row is overwritten
      Vector16 peak = Vector16{} - std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < whole; i += 16) peak = max16(peak, load16f(z + i));
      float m = whole ? lane_max(peak) : -std::numeric_limits<float>::infinity();
      for (int64_t i = whole; i < vocab; ++i) m = std::max(m, z[i]);
      m *= inverse_t;
      Vector16 total = {}, weighted = {};
      for (int64_t i = 0; i < whole; i += 16) {
        const Vector16 shifted = load16f(z + i) * inverse_t - m;
        const Vector16 e = exp16(shifted);
        total += e;
        weighted += e * shifted;
        if (gradient) store16(z + i, e);
      }
      float sum = lane_sum(total), weighted_sum = lane_sum(weighted);
      for (int64_t i = whole; i < vocab; ++i) {
        const float shifted = z[i] * inverse_t - m, e = vector_exp(shifted);
        sum += e;
        weighted_sum += e * shifted;
        if (gradient) z[i] = e;
      }
      const float log_normalizer = std::log(sum);
      logprob_data[r] = (target_logit * inverse_t - m) - log_normalizer;
      if (with_entropy) entropy_data[r] = log_normalizer - weighted_sum / sum;
      if (gradient) {
        const float scale = -inverse_t / sum;
        for (int64_t i = 0; i < whole; i += 16) store16(z + i, load16f(z + i) * scale);
        for (int64_t i = whole; i < vocab; ++i) z[i] *= scale;
        z[t] += inverse_t;
      }
    }
  });
  return {logprobs, entropy};
}

// ----- SwiGLU's elementwise part for training: y = silu(gate) * up, and its gradients ---------------------
// One pass over the elements each way (autograd's graph makes 2 forward and 5 backward passes, with
// intermediate tensors). sigmoid(g) = 1 / (1 + e^-g); silu'(g) = s (1 + g (1 - s)).
template <bool BACKWARD>
void silu_mul_elements(const float* gate, const float* up, const float* grad, float* out, float* grad_up,
                       int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const Vector16 g = load16f(gate + i), u = load16f(up + i);
    const Vector16 s = 1.f / (1.f + exp16(-g));
    if constexpr (BACKWARD) {
      const Vector16 dy = load16f(grad + i);
      store16(out + i, dy * u * s * (1.f + g * (1.f - s)));
      store16(grad_up + i, dy * g * s);
    } else {
      store16(out + i, g * s * u);
    }
  }
  for (; i < end; ++i) {
    const float g = gate[i], u = up[i], s = 1.f / (1.f + vector_exp(-g));
    if constexpr (BACKWARD) {
      out[i] = grad[i] * u * s * (1.f + g * (1.f - s));
      grad_up[i] = grad[i] * g * s;
    } else {
      out[i] = g * s * u;
    }
  }
}

// silu(gate) * up for contiguous fp32 tensors of one shape; with `grad` (d loss / d y) given, returns the
// gradients (d gate, d up) instead.
std::vector<torch::Tensor> silu_mul(const torch::Tensor& gate, const torch::Tensor& up,
                                    const c10::optional<torch::Tensor>& grad) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.sizes() == up.sizes() &&
                  gate.is_contiguous() && up.is_contiguous(),
              "silu_mul: gate and up must be contiguous fp32 tensors of one shape");
  const int64_t n = gate.numel();
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  auto out = torch::empty_like(gate, at::MemoryFormat::Contiguous);
  float* o = out.data_ptr<float>();
  if (!grad.has_value()) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) { silu_mul_elements<false>(g, u, nullptr, o, nullptr, begin, end); });
    return {out};
  }
  TORCH_CHECK(grad->sizes() == gate.sizes() && grad->scalar_type() == at::kFloat, "silu_mul: grad must be shaped like gate");
  const auto dy = grad->contiguous();
  auto grad_up = torch::empty_like(gate, at::MemoryFormat::Contiguous);
  const float* d = dy.data_ptr<float>();
  float* du = grad_up.data_ptr<float>();
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) { silu_mul_elements<true>(g, u, d, o, du, begin, end); });
  return {out, grad_up};
}

// ----- RMSNorm's backward for training (fp32) ------------------------------------------------------------
// With r = 1 / sqrt(mean(x^2) + eps), n = x r and g = dy w: dx = r (g - n (g . n) / dim), dw = sum over
// rows of dy n. One pass per row (r recomputed); the weight gradient summed per thread, then added up.
void rms_norm_backward_rows(const float* x, const float* w, const float* dy, float* dx, float* dw, int64_t begin,
                            int64_t end, int64_t dim, float eps) {
  for (int64_t row = begin; row < end; ++row) {
    const float *xr = x + row * dim, *dyr = dy + row * dim;
    float* dxr = dx + row * dim;
    float squares = 0.f, dot = 0.f;
    for (int64_t i = 0; i < dim; ++i) {
      squares += xr[i] * xr[i];
      dot += dyr[i] * w[i] * xr[i];
    }
    const float r = 1.f / std::sqrt(squares / dim + eps);
    const float correction = dot * r * r / dim;  // (g . n) / dim divided by r, so that dx = r (g - x correction)
    for (int64_t i = 0; i < dim; ++i) {
      dxr[i] = r * (dyr[i] * w[i] - xr[i] * correction);
      dw[i] += dyr[i] * xr[i] * r;
    }
  }
}

// (dx, dweight) of F.rms_norm(x, [dim], weight, eps) for contiguous fp32 x and grad [..., dim].
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& x, const torch::Tensor& weight,
                                             const torch::Tensor& grad, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat &&
                  x.is_contiguous() && grad.sizes() == x.sizes() && weight.dim() == 1 && x.dim() >= 1 &&
                  weight.size(0) == x.size(-1),
              "rms_norm_backward: fp32 contiguous x, grad shaped like it, weight [x's last dimension]");
  const auto dy = grad.contiguous();
  const auto w = weight.contiguous();
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  auto dx = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
  auto partial = torch::zeros({parts, dim}, x.options());
  const float *xd = x.data_ptr<float>(), *wd = w.data_ptr<float>(), *dyd = dy.data_ptr<float>();
  float *dxd = dx.data_ptr<float>(), *pd = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      rms_norm_backward_rows(xd, wd, dyd, dxd, pd + part * dim, rows * part / parts, rows * (part + 1) / parts, dim,
                             static_cast<float>(eps));
  });
  return {dx, partial.sum(0)};
}

// In place, R query rows' scores (row r at scores + r * stride, keys of them) -> scale-d, masked
// (masks[r][t * mask_stride]), softmaxed probabilities (masked keys 0; a row with every key masked all 0),
// 16 keys a vector (the last one partial): the grouped-query decode attention's softmax, for a few query
// rows over their sequence's cached keys. The rows go together, so their max and sum chains overlap.
template <int R>
void softmax_rows(float* scores, int64_t stride, int64_t keys, float scale, const bool* const* masks,
                  int64_t mask_stride) {
  const float lowest = -std::numeric_limits<float>::infinity();
  Vector16 peaks[R], totals[R];
  for (int r = 0; r < R; ++r) peaks[r] = Vector16{} + lowest, totals[r] = Vector16{};
  for (int64_t t = 0; t < keys; t += 16) {
    const int64_t count = std::min<int64_t>(16, keys - t);
    for (int r = 0; r < R; ++r) {
      float* row = scores + r * stride;
      const Vector16 scaled = load16_tail(row + t, count) * scale;
      Vector16 v;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      if (mask_stride == 1) {  // 16 mask bytes at once
        const __m128i bytes = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), masks[r] + t);
        v = as_vector16(_mm512_mask_blend_ps(_mm_test_epi8_mask(bytes, bytes), _mm512_set1_ps(lowest), as_m512(scaled)));
      } else
#endif
        for (int l = 0; l < 16; ++l) v[l] = l < count && masks[r][(t + l) * mask_stride] ? scaled[l] : lowest;
      store16_tail(row + t, v, count);
      peaks[r] = max16(peaks[r], v);
    }
  }
  float peak[R], inverse[R];
  for (int r = 0; r < R; ++r) {
    peak[r] = lane_max(peaks[r]);
    if (peak[r] == lowest) peak[r] = 0.f;  // every key masked: all exponentials 0, the row 0 below
  }
  for (int64_t t = 0; t < keys; t += 16) {
    const int64_t count = std::min<int64_t>(16, keys - t);
    for (int r = 0; r < R; ++r) {
      Vector16 e = exp16(load16_tail(scores + r * stride + t, count) - peak[r]);
      for (int l = static_cast<int>(count); l < 16; ++l) e[l] = 0.f;  // the lanes past the keys
      store16_tail(scores + r * stride + t, e, count);
      totals[r] += e;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float total = lane_sum(totals[r]);
    inverse[r] = total > 0.f ? 1.f / total : 0.f;
  }
  for (int64_t t = 0; t < keys; t += 16) {
    const int64_t count = std::min<int64_t>(16, keys - t);
    for (int r = 0; r < R; ++r)
      store16_tail(scores + r * stride + t, load16_tail(scores + r * stride + t, count) * inverse[r], count);
  }
}

// softmax_rows over `rows` rows, up to 4 at a time.
void softmax_rows_any(float* scores, int64_t stride, int64_t rows, int64_t keys, float scale, const bool* const* masks,
                      int64_t mask_stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) softmax_rows<4>(scores + r * stride, stride, keys, scale, masks + r, mask_stride);
  switch (rows - r) {
    case 3: softmax_rows<3>(scores + r * stride, stride, keys, scale, masks + r, mask_stride); break;
    case 2: softmax_rows<2>(scores + r * stride, stride, keys, scale, masks + r, mask_stride); break;
    case 1: softmax_rows<1>(scores + r * stride, stride, keys, scale, masks + r, mask_stride); break;
  }
}


// Temperature sampling of rows of fp32 logits in one call. Per row, e = exp(logits / temperature - max)
// in fp32 (the unnormalized softmax), its fp64 total taken 16 values at a time (each block's fp32 lane
// sum, the running sums in fp64); the token is the first whose running fp64 sum exceeds u * total, found by skipping
// whole 16-value blocks, then lane by lane within one (the last of that block if rounding leaves none):
// inverse_cdf's rule on the softmax, without a sequential fp64 pass over the vocabulary. Also the chosen
// token's log-probability, z - max - log(sum e), z = logits * (1 / temperature). Returns (tokens int64 [rows], logprobs fp32 [rows]).
std::vector<torch::Tensor> sample_rows(const torch::Tensor& logits, const torch::Tensor& temperature,
                                       const torch::Tensor& u) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.scalar_type() == at::kFloat,
              "sample_rows: logits must be fp32 [rows, vocab] with vocab > 0");
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(u.dim() == 1 && u.size(0) == rows && u.scalar_type() == at::kDouble, "sample_rows: u must be fp64 [rows]");
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == rows && temperature.scalar_type() == at::kFloat,
              "sample_rows: temperature must be fp32 [rows]");
  const auto x = logits.contiguous();
  const auto uniform = u.contiguous();
  const auto temperatures = temperature.contiguous();
  auto tokens = torch::empty({rows}, x.options().dtype(at::kLong));
  auto logprobs = torch::empty({rows}, x.options());
  const float *data = x.data_ptr<float>(), *t = temperatures.data_ptr<float>();
  const double* us = uniform.data_ptr<double>();
  int64_t* chosen = tokens.data_ptr<int64_t>();
  float* chosen_logprob = logprobs.data_ptr<float>();
  const int64_t blocks = (n + 15) / 16;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> e(blocks * 16);
    std::vector<double> block_sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * n;
      const float temp = t[r];
      const int64_t whole = n / 16;
      Vector16 peaks = Vector16{} - std::numeric_limits<float>::infinity();
      for (int64_t b = 0; b < whole; ++b) peaks = max16(peaks, load16f(row + 16 * b));
      float largest = lane_max(peaks);
      for (int64_t i = 16 * whole; i < n; ++i) largest = std::max(largest, row[i]);
      const float inverse = 1.f / temp, peak = largest * inverse;  // scaling by 1 / temp > 0 keeps the order
      Vector16 total32 = {};
      double total = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t count = std::min<int64_t>(16, n - 16 * b);
        Vector16 values = exp16(load16_tail(row + 16 * b, count) * inverse - peak);
        if (count < 16)
          for (int l = static_cast<int>(count); l < 16; ++l) values[l] = 0.f;  // past the vocabulary
        store16(e.data() + 16 * b, values);
        total32 += values;
        const double sum = lane_sum(values);  // 16 values in fp32, the running sums in fp64
        block_sums[b] = sum;
        total += sum;
      }
      const double target = us[r] * total;
      double running = 0.0;
      int64_t at = n - 1, b = 0;
      while (b < blocks - 1 && running + block_sums[b] <= target) running += block_sums[b++];
      for (int64_t i = 16 * b; i < std::min(16 * b + 16, n); ++i) {
        at = i;
        running += static_cast<double>(e[i]);
        if (running > target) break;
      }
      chosen[r] = at;
      chosen_logprob[r] = (row[at] * inverse - peak) - std::log(lane_sum(total32));
    }
  });
  return {tokens, logprobs};
}


constexpr int64_t GQA_PARALLEL_MIN_SCORES = 512;  // (query, position) pairs from which threads share the work

// Grouped-query attention for the few queries of a decode or verify step, in fp32, reading keys and
// values where they lie in the paged pool (key/value pools [slots, kv_heads, dim], `slots` [b, >= t]
// mapping each row's positions; bf16/fp16 rows widened as they are loaded). Per sequence and KV head,
// the scores of all its query rows (group heads x queries) are one small register-blocked product
// over the cached keys (4 keys x 4 query rows of sums at a time: no lanes wasted when a group has
// fewer heads than a vector), then a softmax along each row and the weighted sums of the value rows,
// several query rows per pass. Each (sequence, KV head) is independent: with enough work they are
// split over torch's threads (a batched step's sequences, or one long sequence's KV heads).
template <typename T>
void gqa_decode_rows(const torch::Tensor& query, const torch::Tensor& key_pool, const torch::Tensor& value_pool,
                     const torch::Tensor& slots, const torch::Tensor& mask, float scale, torch::Tensor& out) {
  const int64_t batch = query.size(0), seq = query.size(1), heads = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key_pool.size(1), group = heads / kv_heads, keys = mask.size(3), rows = seq * group;
  const int64_t* slot = slots.data_ptr<int64_t>();
  const bool* allowed = mask.data_ptr<bool>();
  const T* key_data = key_pool.data_ptr<T>();
  const T* value_data = value_pool.data_ptr<T>();
  const T* query_data = query.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t slot_stride = slots.stride(0), key_row = key_pool.stride(0), key_head = key_pool.stride(1);
  const int64_t value_row = value_pool.stride(0), value_head = value_pool.stride(1);
  const int64_t q_batch = query.stride(0), q_seq = query.stride(1), q_head = query.stride(2);
  const int64_t mask_batch = mask.stride(0), mask_seq = mask.stride(2), mask_key = mask.stride(3);
  auto pairs = [&](int64_t first, int64_t last) {
    std::vector<const T*> key_rows(keys), value_rows(keys);
    std::vector<T> zeros(dim, T(0));
    const int64_t score_stride = (keys + 3) / 4 * 4;
    std::vector<float> query_rows(rows * dim), scores(rows * score_stride), mixed(rows * dim);
    std::vector<const bool*> row_masks(rows);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / kv_heads, g = pair % kv_heads;
      const int64_t* positions = slot + b * slot_stride;
      for (int64_t t = 0; t < keys; ++t) {
        key_rows[t] = key_data + positions[t] * key_row + g * key_head;
        value_rows[t] = value_data + positions[t] * value_row + g * value_head;
      }
      for (int64_t s = 0; s < seq; ++s)  // row s * group + h: query s of head g * group + h
        for (int64_t h = 0; h < group; ++h)
          to_float(query_data + b * q_batch + s * q_seq + (g * group + h) * q_head, dim,
                   query_rows.data() + (s * group + h) * dim);
      key_scores(key_rows.data(), keys, zeros.data(), query_rows.data(), rows, dim, scores.data(), score_stride);
      for (int64_t row = 0; row < rows; ++row) row_masks[row] = allowed + b * mask_batch + row / group * mask_seq;
      softmax_rows_any(scores.data(), score_stride, rows, keys, scale, row_masks.data(), mask_key);
      weighted_sums_any(scores.data(), score_stride, value_rows.data(), dim, keys, rows, mixed.data(), dim);
      for (int64_t s = 0; s < seq; ++s)
        for (int64_t h = 0; h < group; ++h) {
          T* o = out_data + ((b * seq + s) * heads + g * group + h) * dim;
          const float* m = mixed.data() + (s * group + h) * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(m[d]);
        }
    }
  };
  if (batch * seq * keys >= GQA_PARALLEL_MIN_SCORES)
    at::parallel_for(0, batch * kv_heads, 1, pairs);
  else
    pairs(0, batch * kv_heads);
}

// The end of the region where fused multiply-adds are allowed (see MATRIX_ROWS). GCC inlines a function
// only into one compiled with the same options: kernels that call the helpers above belong inside.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

template <typename T>
inline float rounded(float value) {
  return static_cast<float>(static_cast<T>(value));
}

// Index of the first maximum of row[0:n] (of the first NaN if there is one, as torch.argmax): one
// pass in vectors of 16 keeping each lane's peak and whether it saw a NaN, then a pass in vectors for
// the first one holding the peak (or a NaN), scanned lane by lane.
template <typename T>
int64_t argmax_row(const T* row, int64_t n) {
  Vector16 peaks = Vector16{} - std::numeric_limits<float>::infinity();
  Mask16 nans = {};
  const int64_t whole = n / 16 * 16;
  for (int64_t i = 0; i < whole; i += 16) {
    const Vector16 v = load16(row + i);
    nans |= v != v;
    peaks = v > peaks ? v : peaks;
  }
  bool nan = false;
  float peak = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < 16; ++l) {
    nan |= nans[l] != 0;
    peak = std::max(peak, peaks[l]);
  }
  for (int64_t i = whole; i < n; ++i) {
    const float v = static_cast<float>(row[i]);
    nan |= v != v;
    peak = std::max(peak, v);
  }
  auto is_answer = [&](float v) { return nan ? v != v : v == peak; };
  for (int64_t i = 0; i < whole; i += 16) {
    const Vector16 v = load16(row + i);
    const Mask16 hit = nan ? v != v : v == peak;
    bool any = false;
    for (int l = 0; l < 16; ++l) any |= hit[l] != 0;
    if (any)
      for (int l = 0; l < 16; ++l)
        if (is_answer(v[l])) return i + l;
  }
  for (int64_t i = whole; i < n; ++i)
    if (is_answer(static_cast<float>(row[i]))) return i;
  return 0;  // unreachable: the peak (or a NaN) is in the row
}

// Indices of the k largest values of `values` (n of them), largest first; ties go to the lower index.
void top_indices(const float* values, int64_t n, int64_t k, int64_t* out, std::vector<int64_t>& order) {
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  });
  std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  TORCH_CHECK(weight.numel() == x.size(-1), "rms_norm: weight must have x's last dimension");
  const auto input = x.contiguous();
  const auto w = weight.contiguous();
  auto y = torch::empty_like(input);
  const int64_t dim = input.size(-1);
  const int64_t rows = dim == 0 ? 0 : input.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rms_norm", [&] {
    const scalar_t *in = input.data_ptr<scalar_t>(), *weights = w.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {  // a decode step's rows: one part
      rms_norm_rows<scalar_t>(in + begin * dim, weights, out + begin * dim, end - begin, dim, static_cast<float>(eps));
    });
  });
  return y;
}

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_and_mul: the last dimension must be even (gate | up)");
  const auto input = x.contiguous();
  const int64_t half = input.size(-1) / 2;
  auto sizes = input.sizes().vec();
  sizes.back() = half;
  auto y = torch::empty(sizes, input.options());
  const int64_t rows = half == 0 ? 0 : input.numel() / (2 * half);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(input.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, half);
  });
  return y;
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "rope: x must be [batch, seq, (heads,) dim]");
  auto rows = x.dim() == 3 ? x.unsqueeze(2) : x;
  if (rows.stride(3) != 1) rows = rows.contiguous();
  const int64_t batch = rows.size(0), seq = rows.size(1), heads = rows.size(2), dim = rows.size(3);
  TORCH_CHECK(dim % 2 == 0 && cos.dim() == 3 && cos.size(1) == seq && cos.size(2) == dim / 2 &&
                  (cos.size(0) == batch || cos.size(0) == 1) && sin.sizes() == cos.sizes(),
              "rope: cos/sin must be [batch or 1, seq, dim / 2]");
  const auto c = cos.to(at::kFloat).contiguous(), n = sin.to(at::kFloat).contiguous();
  auto y = torch::empty({batch, seq, heads, dim}, rows.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t strides[3] = {rows.stride(0), rows.stride(1), rows.stride(2)};
  const int64_t angle_batch_stride = c.size(0) == 1 ? 0 : seq * (dim / 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(rows.data_ptr<scalar_t>(), c.data_ptr<float>(), n.data_ptr<float>(), y.data_ptr<scalar_t>(),
                        batch, seq, heads, dim, strides, angle_batch_stride, interleaved);
  });
  return y.view(x.sizes());
}

// MultiHeadLatentAttention's cache write for a decode or verify step in one pass: each token's
// compressed kv [rank | rope] (kv [b, s, rank + rope], last dimension contiguous) goes to the pool rows
// at its write slot as the normalized latent (rms_norm's rows, weight `norm`) and the rotated rope key
// (rope's rows, angles [b or 1, s, rope / 2]): the bits of rms_norm, rope and index_copy_, without
// their seven tensor ops (~5 us a layer: 10% of a 12-layer nano model's decode step). Pools in kv's dtype.
void mla_cache_write(const torch::Tensor& kv, const torch::Tensor& norm, double eps, const torch::Tensor& cos,
                     const torch::Tensor& sin, bool interleaved, torch::Tensor& latent_pool, torch::Tensor& pe_pool,
                     const torch::Tensor& write_slots) {
  const int64_t rank = latent_pool.size(1), rope_dim = pe_pool.size(1), half = rope_dim / 2;
  TORCH_CHECK(kv.dim() == 3 && kv.stride(2) == 1 && kv.size(2) == rank + rope_dim && latent_pool.dim() == 2 &&
                  pe_pool.dim() == 2 && latent_pool.is_contiguous() && pe_pool.is_contiguous() &&
                  latent_pool.scalar_type() == kv.scalar_type() && pe_pool.scalar_type() == kv.scalar_type() &&
                  norm.scalar_type() == kv.scalar_type() && norm.is_contiguous() && norm.numel() == rank,
              "mla_cache_write: kv [b, s, rank + rope] and contiguous pools [slots, rank], [slots, rope] of its dtype");
  const int64_t batch = kv.size(0), seq = kv.size(1);
  TORCH_CHECK(write_slots.scalar_type() == at::kLong && write_slots.is_contiguous() && write_slots.numel() == batch * seq,
              "mla_cache_write: one int64 write slot per token");
  TORCH_CHECK(cos.dim() == 3 && cos.size(1) == seq && cos.size(2) == half && (cos.size(0) == batch || cos.size(0) == 1) &&
                  sin.sizes() == cos.sizes(), "mla_cache_write: cos/sin must be [batch or 1, seq, rope / 2]");
  const auto c = cos.to(at::kFloat).contiguous(), n = sin.to(at::kFloat).contiguous();
  const int64_t angle_batch_stride = c.size(0) == 1 ? 0 : seq * half, slots = latent_pool.size(0);
  const int64_t* slot = write_slots.data_ptr<int64_t>();
  const int64_t no_strides[3] = {0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv.scalar_type(), "mla_cache_write", [&] {
    const scalar_t* rows = kv.data_ptr<scalar_t>();
    scalar_t *latent = latent_pool.data_ptr<scalar_t>(), *pe = pe_pool.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < seq; ++t) {
        const int64_t at = slot[b * seq + t];
        TORCH_CHECK(at >= 0 && at < slots, "mla_cache_write: write slot out of range");
        const scalar_t* row = rows + b * kv.stride(0) + t * kv.stride(1);
        rms_norm_rows<scalar_t>(row, norm.data_ptr<scalar_t>(), latent + at * rank, 1, rank, static_cast<float>(eps));
        const int64_t angles = b * angle_batch_stride + t * half;
        rope_rows<scalar_t>(row + rank, c.data_ptr<float>() + angles, n.data_ptr<float>() + angles, pe + at * rope_dim, 1, 1, 1,
                            rope_dim, no_strides, 0, interleaved);
      }
  });
}

torch::Tensor mla_decode_attention(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& latent,
                                   const torch::Tensor& k_pe, const c10::optional<torch::Tensor>& slots,
                                   const torch::Tensor& mask, const torch::Tensor& w_uk, const torch::Tensor& w_uv_t,
                                   double scale) {
  const int64_t cache_dims = slots.has_value() ? 2 : 3;
  TORCH_CHECK(q_nope.dim() == 4 && q_pe.dim() == 4 && latent.dim() == cache_dims && k_pe.dim() == cache_dims &&
                  mask.dim() == 4 && mask.size(0) == q_nope.size(0) && mask.size(2) == q_nope.size(1),
              "mla_decode_attention: q [b, s, h, d], latent/k_pe [b, t, d] (or pool [slots, d] with slots [b, t]), "
              "mask [b, 1, s, t]");
  TORCH_CHECK(slots.has_value() ? slots->scalar_type() == at::kLong && slots->dim() == 2 &&
                                      slots->size(0) == q_nope.size(0) && slots->size(1) >= mask.size(3) &&
                                      slots->stride(1) == 1
                                : latent.size(1) == mask.size(3) && k_pe.size(1) == mask.size(3),
              "mla_decode_attention: the cache must cover the mask's keys");
  TORCH_CHECK(q_nope.scalar_type() == q_pe.scalar_type() && latent.scalar_type() == q_nope.scalar_type() &&
                  k_pe.scalar_type() == q_nope.scalar_type(), "mla_decode_attention: inputs must share a dtype");
  TORCH_CHECK(w_uk.scalar_type() == at::kFloat && w_uv_t.scalar_type() == at::kFloat && w_uk.is_contiguous() &&
                  w_uv_t.is_contiguous(), "mla_decode_attention: absorbed weights must be contiguous fp32");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mla_decode_attention: mask must be bool");
  for (const auto* t : {&q_nope, &q_pe, &latent, &k_pe})
    TORCH_CHECK(t->stride(-1) == 1, "mla_decode_attention: last dimensions must be contiguous");
  auto out = torch::empty({q_nope.size(0), q_nope.size(1), q_nope.size(2), w_uv_t.size(2)}, q_nope.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_nope.scalar_type(), "mla_decode_attention", [&] {
    mla_decode_rows<scalar_t>(q_nope, q_pe, latent, k_pe, slots, mask, w_uk.data_ptr<float>(), w_uv_t.data_ptr<float>(),
                              static_cast<float>(scale), out);
  });
  return out;
}

// [b, s, h, d] grouped-query attention of a decode or verify step over the paged pool (see
// gqa_decode_rows); query's last dimension contiguous, pools [slots, kv_heads, d] in query's dtype.
torch::Tensor gqa_decode_attention(const torch::Tensor& query, const torch::Tensor& key_pool,
                                   const torch::Tensor& value_pool, const torch::Tensor& slots, const torch::Tensor& mask,
                                   double scale) {
  TORCH_CHECK(query.dim() == 4 && key_pool.dim() == 3 && value_pool.sizes() == key_pool.sizes() &&
                  key_pool.size(2) == query.size(3) && query.size(2) % key_pool.size(1) == 0,
              "gqa_decode_attention: query [b, s, h, d], pools [slots, kv_heads, d] with h a multiple of kv_heads");
  TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(0) == query.size(0) &&
                  mask.size(2) == query.size(1),
              "gqa_decode_attention: mask must be bool [b, 1, s, t]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == query.size(0) &&
                  slots.size(1) >= mask.size(3) && slots.stride(1) == 1,
              "gqa_decode_attention: slots [b, >= t] int64 must cover the mask's keys");
  TORCH_CHECK(key_pool.scalar_type() == query.scalar_type() && value_pool.scalar_type() == query.scalar_type(),
              "gqa_decode_attention: pools and query must share a dtype");
  for (const auto* t : {&query, &key_pool, &value_pool})
    TORCH_CHECK(t->stride(-1) == 1, "gqa_decode_attention: last dimensions must be contiguous");
  auto out = torch::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "gqa_decode_attention", [&] {
    gqa_decode_rows<scalar_t>(query, key_pool, value_pool, slots, mask, static_cast<float>(scale), out);
  });
  return out;
}

// nanoseek.infer.quant.int8_linear's packed-kernel path as one call (the same ATen ops, minus the
// Python dispatch of each): x [..., in] @ (q * scale)^T computed in scale's dtype, returned in x's.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias) {
  auto rows = x.reshape({-1, x.size(-1)}).to(scale.scalar_type()).contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = q.size(0);
  auto out = at::_weight_int8pack_mm(rows, q, scale).view(sizes).to(x.scalar_type());
  return bias.has_value() ? out + bias->to(out.scalar_type()) : out;
}

// F.linear(x, weight, bias) for the few rows of a decode or verify step (fp32): the same products as
// the routed-experts kernel (matrix_vectors: register blocks of 4 weight rows x the step's vectors), so
// the weight is read once, in order, with no packing of it and no library call. Its rows are split over
// torch's threads in chunks of at least ROWS_LINEAR_CHUNK weights (smaller matrices run on one thread:
// waking a second costs more than it saves). fp32 sums in another order than F.linear's.
constexpr int64_t ROWS_LINEAR_CHUNK = 1 << 15;

// The frame both few-row products share: x [..., n] as contiguous rows, an fp32 bias [outs] or none,
// and `fill(xs, rows, out)` writing out [rows][outs] (split over torch's threads as it likes); returns
// out + bias shaped like x with outs last.
template <typename Fill>
torch::Tensor rows_product(const char* name, const torch::Tensor& x, int64_t n, int64_t outs,
                           const c10::optional<torch::Tensor>& bias, Fill&& fill) {
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == outs), name,
              ": an fp32 bias [out]");
  const auto flat = x.reshape({-1, n}).contiguous();
  const int64_t rows = flat.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = outs;
  auto out = at::empty({rows, outs}, x.options());
  if (rows == 0 || outs == 0) return out.view(sizes);
  float* o = out.data_ptr<float>();
  fill(flat.data_ptr<float>(), rows, o);
  if (bias.has_value()) {
    const auto b = bias->contiguous();
    const float* add = b.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < outs; ++j) o[r * outs + j] += add[j];
  }
  return out.view(sizes);
}

torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.is_contiguous() && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "rows_linear: fp32 x [..., n] and a contiguous fp32 weight [out, n]");
  const int64_t n = weight.size(1), outs = weight.size(0);
  const float* w = weight.data_ptr<float>();
  return rows_product("rows_linear", x, n, outs, bias, [&](const float* xs, int64_t rows, float* o) {
    const int64_t blocks = (outs + MATRIX_ROWS - 1) / MATRIX_ROWS;
    const int64_t grain = std::max<int64_t>(1, ROWS_LINEAR_CHUNK / (MATRIX_ROWS * std::max<int64_t>(n, 1)));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      matrix_vectors(w, static_cast<const float*>(nullptr), n, xs, rows, begin * MATRIX_ROWS,
                     std::min(outs, end * MATRIX_ROWS), o, outs);
    });
  });
}

// expert_products with fp32 matrices in panels (packing.pack_expert_panels: [E][P][n][PANEL] per stack):
// runs[u] = (expert's panels, first vector, count); all (expert, panel) pairs split over torch's threads
// as one range, each streamed once for the expert's vectors by panel_rows. Each panel is one sequential
// run of memory, where plain rows of 256 inputs (`small`'s down projections) stream ~30% slower.
template <typename T>
struct PanelRun {
  const T* panels;
  int64_t first, count;
};

template <typename T>
void expert_panel_products(const PanelRun<T>* runs, int64_t count, const float* xs, int64_t n, int64_t outs, float* out) {
  const int64_t per_expert = (outs + PANEL - 1) / PANEL, total = count * per_expert;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (PANEL * std::max<int64_t>(n, 1)));  // as expert_products
  auto panel_of = [&](int64_t unit) { return runs[unit / per_expert].panels + unit % per_expert * n * PANEL; };
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const PanelRun<T>& run = runs[unit / per_expert];
      const int64_t p = unit % per_expert;
      panel_rows(panel_of(unit), n, xs + run.first * n, run.count, out + run.first * outs + p * PANEL, outs,
                 std::min(PANEL, outs - p * PANEL), unit + 1 < end ? panel_of(unit + 1) : nullptr);
    }
  });
}

// F.linear(x, weight, bias) with the fp32 weight in panels (panel_rows above; packing.pack_panels lays
// them out): for the rows of a decode step or a short prefill (layers.PANEL_MAX_ROWS). The panels are
// split over torch's threads in chunks of at least ROWS_LINEAR_CHUNK weights. fp32 sums in another
// order than F.linear's.
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t out_features,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat && panels.dim() == 3 &&
                  panels.size(2) == PANEL && panels.is_contiguous() && x.dim() >= 1 && x.size(-1) == panels.size(1) &&
                  out_features > (panels.size(0) - 1) * PANEL && out_features <= panels.size(0) * PANEL,
              "panel_linear: fp32 x [..., n] and contiguous fp32 panels [ceil(out / 32), n, 32]");
  const int64_t n = panels.size(1), count = panels.size(0);
  const float* w = panels.data_ptr<float>();
  return rows_product("panel_linear", x, n, out_features, bias, [&](const float* xs, int64_t rows, float* o) {
    const int64_t grain = std::max<int64_t>(1, ROWS_LINEAR_CHUNK / (PANEL * std::max<int64_t>(n, 1)));
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        panel_rows(w + p * n * PANEL, n, xs, rows, o + p * PANEL, out_features, std::min(PANEL, out_features - p * PANEL),
                   p + 1 < end ? w + (p + 1) * n * PANEL : nullptr);
    });
  });
}

// A MoE router's fp32 logits x [tokens, n] @ weight [experts, n]^T: for the few tokens of a decode or
// verify step as rows_linear's register blocks (a 2-token at::linear goes through a GEMM call: ~5 us
// against ~1 for one token's GEMV, a nano model's 2-token verification paying it in every layer);
// more tokens take at::linear.
constexpr int64_t ROUTER_KERNEL_MAX_TOKENS = 16;

torch::Tensor router_logits(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 2,
              "router_logits: fp32 x [tokens, n] and weight [experts, n]");
  if (x.size(0) > ROUTER_KERNEL_MAX_TOKENS) return at::linear(x, weight);
  return rows_linear(x, weight.contiguous(), c10::nullopt);
}

// DeepSeek MoE routing from fp32 router logits [tokens, experts]: scores (sigmoid or softmax), the
// optional selection bias (noaux_tc), group-limited selection (a group scores the sum of its top 2
// biased scores for noaux_tc, its max otherwise), top-k, optional renormalization, scaling.
// Returns (weights [tokens, k] fp32, indices [tokens, k] int64, scores [tokens, experts] fp32).
std::vector<torch::Tensor> route(const torch::Tensor& logits, const c10::optional<torch::Tensor>& bias, bool sigmoid,
                                 int64_t n_group, int64_t topk_group, bool group_top2, int64_t top_k, bool normalize,
                                 double scaling) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "route: logits must be fp32 [tokens, experts]");
  const auto input = logits.contiguous();
  const int64_t tokens = input.size(0), experts = input.size(1);
  TORCH_CHECK(experts % n_group == 0 && top_k <= experts && topk_group <= n_group, "route: bad group/top-k sizes");
  const float* bias_data = nullptr;
  torch::Tensor bias_contiguous;
  if (bias.has_value()) {
    bias_contiguous = bias->to(at::kFloat).contiguous();
    bias_data = bias_contiguous.data_ptr<float>();
  }
  auto scores = torch::empty_like(input);
  auto weights = torch::empty({tokens, top_k}, input.options());
  auto indices = torch::empty({tokens, top_k}, input.options().dtype(at::kLong));
  const float* in = input.data_ptr<float>();
  float* score = scores.data_ptr<float>();
  float* weight = weights.data_ptr<float>();
  int64_t* index = indices.data_ptr<int64_t>();
  const int64_t group_size = experts / n_group;
  const bool grouped = n_group > 1 && topk_group < n_group;
  std::vector<float> choice(experts), group_scores(n_group);
  std::vector<int64_t> order, kept(topk_group);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = in + t * experts;
    float* s = score + t * experts;
    if (sigmoid) {
      for (int64_t e = 0; e < experts; ++e) s[e] = 1.f / (1.f + std::exp(-row[e]));
    } else {
      float peak = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t e = 0; e < experts; ++e) peak = std::max(peak, row[e]);
      for (int64_t e = 0; e < experts; ++e) total += (s[e] = std::exp(row[e] - peak));
      for (int64_t e = 0; e < experts; ++e) s[e] /= total;
    }
    for (int64_t e = 0; e < experts; ++e) choice[e] = bias_data ? s[e] + bias_data[e] : s[e];
    if (grouped) {
      for (int64_t g = 0; g < n_group; ++g) {
        const float* members = choice.data() + g * group_size;
        float first = -std::numeric_limits<float>::infinity(), second = first;
        for (int64_t i = 0; i < group_size; ++i) {
          if (members[i] > first) { second = first; first = members[i]; }
          else if (members[i] > second) { second = members[i]; }
        }
        group_scores[g] = group_top2 ? first + (group_size > 1 ? second : 0.f) : first;
      }
      top_indices(group_scores.data(), n_group, topk_group, kept.data(), order);
      std::vector<bool> keep(n_group, false);
      for (int64_t g : kept) keep[g] = true;
      for (int64_t e = 0; e < experts; ++e)
        if (!keep[e / group_size]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    int64_t* chosen = index + t * top_k;
    top_indices(choice.data(), experts, top_k, chosen, order);
    float* w = weight + t * top_k;
    float total = 0.f;
    for (int64_t j = 0; j < top_k; ++j) total += (w[j] = s[chosen[j]]);
    const float divisor = normalize && top_k > 1 ? total + 1e-20f : 1.f;
    for (int64_t j = 0; j < top_k; ++j) w[j] = w[j] / divisor * static_cast<float>(scaling);
  }
  return {weights, indices, scores};
}

namespace {

// routed_experts for activations T and weights W (T, or int8 with a float scale per row), each product's
// input and output rounded to P (T; bf16 for int8 weights, which int8_linear multiplies in bf16).
template <typename T, typename W, typename P>
void routed_experts_rows(const torch::Tensor& x, const W* gate_up, const float* gate_up_scale, const W* down,
                         const float* down_scale, int64_t hidden, const std::vector<int64_t>& counts,
                         const std::vector<int64_t>& slot, int64_t k, const float* gates, torch::Tensor& out,
                         const W* gate_up_panels = nullptr, const W* down_panels = nullptr) {
  const int64_t tokens = x.size(0), dim = x.size(1), pairs = tokens * k;
  const int64_t experts = static_cast<int64_t>(counts.size()) - 1;
  const int64_t up_panels = (2 * hidden + PANEL - 1) / PANEL, dim_panels = (dim + PANEL - 1) / PANEL;
  std::vector<ExpertRun<W>> up_runs, down_runs;
  std::vector<PanelRun<W>> up_panel_runs, down_panel_runs;
  for (int64_t e = 0; e < experts; ++e)
    if (counts[e + 1] > counts[e]) {
      const int64_t first = counts[e], count = counts[e + 1] - counts[e];
      up_runs.push_back({gate_up + e * 2 * hidden * dim, gate_up_scale ? gate_up_scale + e * 2 * hidden : nullptr, first, count});
      down_runs.push_back({down + e * dim * hidden, down_scale ? down_scale + e * dim : nullptr, first, count});
      if (gate_up_panels != nullptr) {
        up_panel_runs.push_back({gate_up_panels + e * up_panels * dim * PANEL, first, count});
        down_panel_runs.push_back({down_panels + e * dim_panels * hidden * PANEL, first, count});
      }
    }
  auto products = [&](bool up, const float* xs, float* result) {
    if (gate_up_panels != nullptr)
      expert_panel_products((up ? up_panel_runs : down_panel_runs).data(), static_cast<int64_t>(up_panel_runs.size()), xs,
                            up ? dim : hidden, up ? 2 * hidden : dim, result);
    else
      expert_products(up ? up_runs : down_runs, xs, up ? dim : hidden, up ? 2 * hidden : dim, result);
  };
  const auto input = x.contiguous();
  std::vector<float> inputs(pairs * dim), projected(pairs * 2 * hidden), activations(pairs * hidden), outputs(pairs * dim);
  // Per-pair and per-token steps are split over the threads too: at prefill sizes they are not small.
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* row = inputs.data() + slot[p] * dim;
      to_float(input.data_ptr<T>() + (p / k) * dim, dim, row);
      if constexpr (!std::is_same_v<T, P>)
        for (int64_t d = 0; d < dim; ++d) row[d] = rounded<P>(row[d]);
    }
  });
  auto activate = [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // silu_and_mul_rows's arithmetic on the rounded products
      const float* row = projected.data() + p * 2 * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const float g = rounded<P>(row[i]);
        activations[p * hidden + i] =
            rounded<P>(rounded<T>(rounded<T>(g / (1.f + vector_exp(-g))) * rounded<P>(row[hidden + i])));
      }
    }
  };
  const int64_t used = static_cast<int64_t>(up_panel_runs.size());
  if (gate_up_panels != nullptr && used >= at::get_num_threads() && used * 2 * hidden * dim >= (1 << 16)) {
    // Whole experts per thread (up, activation, down): one parallel region, no wait between the products.
    at::parallel_for(0, used, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        expert_panel_products(&up_panel_runs[r], 1, inputs.data(), dim, 2 * hidden, projected.data());
        activate(up_panel_runs[r].first, up_panel_runs[r].first + up_panel_runs[r].count);
        expert_panel_products(&down_panel_runs[r], 1, activations.data(), hidden, dim, outputs.data());
      }
    });
  } else {
    products(true, inputs.data(), projected.data());
    at::parallel_for(0, pairs, grain, activate);
    products(false, activations.data(), outputs.data());
  }
  T* result = out.data_ptr<T>();
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t d = 0; d < dim; ++d) {
        float sum = 0.f;
        for (int64_t j = 0; j < k; ++j)
          sum += rounded<T>(gates[t * k + j]) * rounded<T>(rounded<P>(outputs[slot[t * k + j] * dim + d]));
        result[t * dim + d] = static_cast<T>(sum);
      }
  });
}

}  // namespace

// A routed-experts layer at inference, as one call: out[t] = sum_j weights[t, j] down[e] (silu(gate[e]
// x_t) * up[e] x_t), e = indices[t, j], over the stacks gate_up [E, 2I, D] (gate rows first) and down
// [E, D, I]: fp32 or bf16 like x, or int8 with fp32 scales per row (gate_up_scale [E, 2I], down_scale
// [E, D]; x fp32 or bf16, each product's input and output rounded to bf16 as nanoseek.infer.quant's
// int8_linear rounds them). (token, expert) pairs are grouped by expert and each used expert's matrices
// stream once for all of its tokens (`expert_products`), with no call per expert (a oneDNN or MKL call
// costs ~9 us beyond its reading at these sizes) and both threads reading. Sums in fp32, rounded to x's
// dtype where the PyTorch path rounds (each product's output, the activation, the gate-weighted sum over
// a token's experts, in choice order).
torch::Tensor routed_experts(const torch::Tensor& x, const torch::Tensor& gate_up, const torch::Tensor& down,
                             const torch::Tensor& indices, const torch::Tensor& weights,
                             const c10::optional<torch::Tensor>& gate_up_scale,
                             const c10::optional<torch::Tensor>& down_scale,
                             const c10::optional<torch::Tensor>& gate_up_panels,
                             const c10::optional<torch::Tensor>& down_panels) {
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0) &&
                  gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && gate_up.size(1) == 2 * down.size(2),
              "routed_experts: x [T, D], gate_up [E, 2I, D], down [E, D, I]");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0) && indices.scalar_type() == at::kLong &&
                  weights.sizes() == indices.sizes(),
              "routed_experts: indices (int64) and weights must be [T, k]");
  const bool int8 = gate_up.scalar_type() == at::kChar;
  TORCH_CHECK(down.scalar_type() == gate_up.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
              (int8 || gate_up.scalar_type() == x.scalar_type()),
              "routed_experts: fp32 or bf16 stacks like x, or int8 stacks with fp32 or bf16 x");
  TORCH_CHECK(int8 == (gate_up_scale.has_value() && down_scale.has_value()), "routed_experts: int8 stacks need their scales");
  if (int8)
    TORCH_CHECK(gate_up_scale->scalar_type() == at::kFloat && down_scale->scalar_type() == at::kFloat &&
                    gate_up_scale->is_contiguous() && down_scale->is_contiguous() &&
                    gate_up_scale->sizes() == gate_up.sizes().slice(0, 2) && down_scale->sizes() == down.sizes().slice(0, 2),
                "routed_experts: scales must be contiguous fp32 [E, rows]");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "routed_experts: the stacks must be contiguous");
  TORCH_CHECK(gate_up_panels.has_value() == down_panels.has_value(), "routed_experts: panels for both stacks or neither");
  if (gate_up_panels.has_value()) {
    const int64_t e = gate_up.size(0), i = down.size(2), d = x.size(1);
    TORCH_CHECK(!int8 && gate_up_panels->is_contiguous() && down_panels->is_contiguous() &&
                    gate_up_panels->scalar_type() == gate_up.scalar_type() &&
                    down_panels->scalar_type() == gate_up.scalar_type() &&
                    gate_up_panels->sizes() == at::IntArrayRef({e, (2 * i + PANEL - 1) / PANEL, d, PANEL}) &&
                    down_panels->sizes() == at::IntArrayRef({e, (d + PANEL - 1) / PANEL, i, PANEL}),
                "routed_experts: panels are [E, ceil(2I / 32), D, 32] and [E, ceil(D / 32), I, 32] in the dtype of fp32 or bf16 stacks");
  }
  const int64_t tokens = x.size(0), k = indices.size(1), hidden = down.size(2), experts = gate_up.size(0);
  const auto choice = indices.contiguous();
  const auto gate = weights.to(at::kFloat).contiguous();
  const int64_t* chosen = choice.data_ptr<int64_t>();
  // Pairs in expert order (stable: by token within an expert); slot[p] is pair p's place in that order.
  std::vector<int64_t> counts(experts + 1, 0), slot(tokens * k);
  for (int64_t p = 0; p < tokens * k; ++p) {
    TORCH_CHECK(chosen[p] >= 0 && chosen[p] < experts, "routed_experts: expert index out of range");
    ++counts[chosen[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) counts[e + 1] += counts[e];
  std::vector<int64_t> next(counts.begin(), counts.end() - 1);
  for (int64_t p = 0; p < tokens * k; ++p) slot[p] = next[chosen[p]]++;
  auto out = torch::empty({tokens, x.size(1)}, x.options());
  const float* gates = gate.data_ptr<float>();
  if (int8) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "routed_experts", [&] {
      routed_experts_rows<scalar_t, int8_t, c10::BFloat16>(x, gate_up.data_ptr<int8_t>(), gate_up_scale->data_ptr<float>(),
                                                           down.data_ptr<int8_t>(), down_scale->data_ptr<float>(), hidden,
                                                           counts, slot, k, gates, out);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "routed_experts", [&] {
      routed_experts_rows<scalar_t, scalar_t, scalar_t>(
          x, gate_up.data_ptr<scalar_t>(), nullptr, down.data_ptr<scalar_t>(), nullptr, hidden, counts, slot, k, gates, out,
          gate_up_panels.has_value() ? gate_up_panels->data_ptr<scalar_t>() : nullptr,
          down_panels.has_value() ? down_panels->data_ptr<scalar_t>() : nullptr);
    });
  }
  return out;
}

// torch.argmax(x, dim=-1) for greedy decoding: the first maximum per row, int64 [...]. fp32, bf16 or
// fp16 read as they are (no widened copy), one thread: a 32k vocabulary in L2 per row.
torch::Tensor argmax(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "argmax: the last dimension must not be empty");
  const auto input = x.contiguous();
  const int64_t n = input.size(-1), rows = input.numel() / n;
  auto sizes = input.sizes().vec();
  sizes.pop_back();
  auto out = torch::empty(sizes, input.options().dtype(at::kLong));
  int64_t* index = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "argmax", [&] {
    const scalar_t* data = input.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) index[r] = argmax_row(data + r * n, n);
  });
  return out;
}

// Inverse-CDF sampling, as nanoseek.infer.sampling.draw: per row the cumulative sums of probs in fp64
// (the order torch's cumsum adds in, so the same sums), target = u * total, and the first position whose
// sum exceeds it (searchsorted, right=True), clamped to the last token. The sums of DRAW_ROWS rows run
// interleaved: each is a chain of dependent adds, and independent chains keep the adder busy (one row at
// a time waits on each add's latency). torch's route casts the rows to fp64 first (a copy), then cumsum
// and searchsorted: three ops and two [rows, vocab] fp64 tensors.
constexpr int64_t DRAW_ROWS = 8;

torch::Tensor inverse_cdf(const torch::Tensor& probs, const torch::Tensor& u) {
  TORCH_CHECK(probs.dim() == 2 && probs.size(1) > 0 && probs.scalar_type() == at::kFloat,
              "inverse_cdf: probs must be fp32 [rows, vocab] with vocab > 0");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == probs.size(0) && u.scalar_type() == at::kDouble,
              "inverse_cdf: u must be fp64 [rows]");
  const auto p = probs.contiguous();
  const auto uniform = u.contiguous();
  const int64_t rows = p.size(0), n = p.size(1);
  auto out = torch::empty({rows}, p.options().dtype(at::kLong));
  const float* data = p.data_ptr<float>();
  const double* us = uniform.data_ptr<double>();
  int64_t* tokens = out.data_ptr<int64_t>();
  // every value is written before it is read: no zero-filling (2 MB for 8 rows of a 32k vocabulary)
  std::unique_ptr<double[]> cdf(new double[std::min(DRAW_ROWS, rows) * n]);
  for (int64_t first = 0; first < rows; first += DRAW_ROWS) {
    const int64_t count = std::min(DRAW_ROWS, rows - first);
    double sums[DRAW_ROWS] = {};
    if (count == DRAW_ROWS) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < DRAW_ROWS; ++r) {
          sums[r] += static_cast<double>(data[(first + r) * n + i]);
          cdf[r * n + i] = sums[r];
        }
    } else {
      for (int64_t r = 0; r < count; ++r)
        for (int64_t i = 0; i < n; ++i) {
          sums[r] += static_cast<double>(data[(first + r) * n + i]);
          cdf[r * n + i] = sums[r];
        }
    }
    for (int64_t r = 0; r < count; ++r) {
      const double* row = cdf.get() + r * n;
      const double target = us[first + r] * row[n - 1];
      const int64_t at = std::upper_bound(row, row + n, target) - row;
      tokens[first + r] = std::min(at, n - 1);
    }
  }
  return out;
}

// ----- a whole decoder layer of a decode step ------------------------------------------------------
// What DecoderLayer.forward runs for the few rows of a decode or verify step over the paged cache, as
// one call: the same ATen ops and kernels in the same order (so the same numbers), without the Python
// between them (module calls, views, checks: a `small` MoE layer 241 -> 174 us in a hot loop). nanoseek/model/
// decode_layer.py builds a DecodeLayer from a layer's modules and decides when it applies.

namespace {

// One linear layer, run as the Python module runs it. kind: 0 F.linear; 1 nanoseek.model.layers.linear
// (rows_linear for 1 to few_to rows, else as its RowRule says: the transposed product, oneDNN's GEMM on
// the plain weight, or F.linear); 2 a oneDNN-packed weight (packing.packed_linear); 3 int8 with
// per-row scales (quant.int8_linear's packed-kernel path); 4 an fp32 weight in panels with its plain
// tensor (packing.panel_product).
// How `linear` (kind 1) picks its product here and now: the transposed product for rows in [few_from,
// few_to] (layers.few_row_range), oneDNN's GEMM from onednn_from multiply-adds (kernels.onednn_from).
struct RowRule {
  int64_t few_from = 1, few_to = 0, onednn_from = std::numeric_limits<int64_t>::max();
};

struct Product {
  int64_t kind = -1;
  torch::Tensor weight;
  c10::optional<torch::Tensor> bias, scale;
  // kind 4: `weight` holds the panels, `plain` the [out, in] tensor; steps of up to panel_rows rows take
  // the panels, more rows `plain` as kind 1 would (packing.panel_product)
  c10::optional<torch::Tensor> plain;
  int64_t panel_rows = 0;

  torch::Tensor operator()(const torch::Tensor& x, const RowRule& rule) const;
};

torch::Tensor linear_pointwise(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias, std::string("none"), c10::List<c10::optional<c10::Scalar>>(),
                          c10::optional<std::string>(std::string())};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

torch::Tensor Product::operator()(const torch::Tensor& x, const RowRule& rule) const {
  if (kind == 4) {
    if (x.scalar_type() != at::kFloat) return (*this)(x.to(at::kFloat), rule).to(x.scalar_type());
    const int64_t rows = x.size(-1) > 0 ? x.numel() / x.size(-1) : 0;
    if (rows >= 1 && rows <= panel_rows) return panel_linear(x, weight, plain->size(0), bias);
    return Product{1, *plain, bias}(x, rule);
  }
  if (kind == 2) {
    if (x.scalar_type() == weight.scalar_type()) return linear_pointwise(x, weight, bias);
    c10::optional<torch::Tensor> converted;
    if (bias.has_value()) converted = bias->to(weight.scalar_type());
    return linear_pointwise(x.to(weight.scalar_type()), weight, converted).to(x.scalar_type());
  }
  if (kind == 3) return int8_linear(x, weight, *scale, bias);
  if (kind == 1 && weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && x.size(-1) > 0) {
    const int64_t rows = x.numel() / x.size(-1);
    auto sizes = x.sizes().vec();
    sizes.back() = weight.size(0);
    if (rows >= 1 && rows <= rule.few_to && weight.is_contiguous()) return rows_linear(x, weight, bias);
    if (rows >= rule.few_from && rows <= rule.few_to && weight.is_contiguous()) {
      auto flat = x.reshape({rows, x.size(-1)});
      if (rows == 1) flat = at::cat({flat, flat});
      auto columns = bias.has_value() ? at::addmm(bias->unsqueeze(1), weight, flat.t()) : at::mm(weight, flat.t());
      auto out = rows == 1 ? columns.slice(1, 0, 1) : columns;
      return out.t().contiguous().view(sizes);
    }
    if (rows * weight.size(0) * weight.size(1) >= rule.onednn_from)  // kernels.onednn_product on the plain weight
      return linear_pointwise(x.reshape({rows, x.size(-1)}), weight, bias).view(sizes);
  }
  return at::linear(x, weight, bias);
}

}  // namespace

struct DecodeLayer {
  // the norms around attention
  torch::Tensor input_norm, post_norm;
  double input_eps = 1e-6, post_eps = 1e-6;
  // attention: the input projections (one fused product split in `first_sizes`, or one product each)
  bool mla = true;
  Product fused_input;
  std::vector<Product> inputs;  // q (or q_a) and kv_a for MLA; q, k, v for GQA; empty when fused
  std::vector<int64_t> input_sizes;
  // MLA
  c10::optional<torch::Tensor> q_norm;
  double q_eps = 1e-6, kv_eps = 1e-6, scale = 1.0;
  Product q_b;
  torch::Tensor kv_norm, w_uk, w_uv_t;
  int64_t heads = 0, nope = 0, rope_dim = 0, kv_rank = 0, kv_heads = 0, head_dim = 0;
  bool interleaved = true;
  Product o;
  // feed-forward: SwiGLU (the dense MLP, or the MoE's shared experts) and the routed experts
  bool moe = false, has_mlp = false;
  Product gate_up, down;
  torch::Tensor router;
  c10::optional<torch::Tensor> router_bias;
  bool sigmoid = true, group_top2 = true, normalize = true;
  int64_t n_group = 1, topk_group = 1, top_k = 1;
  double scaling = 1.0;
  torch::Tensor stack_gate_up, stack_down;
  c10::optional<torch::Tensor> stack_gate_up_scale, stack_down_scale, stack_gate_up_panels, stack_down_panels;

  std::vector<torch::Tensor> input_products(const torch::Tensor& h, const RowRule& rule) const {
    if (inputs.empty()) return fused_input(h, rule).split_with_sizes(input_sizes, -1);
    std::vector<torch::Tensor> outs;
    for (const auto& product : inputs) outs.push_back(product(h, rule));
    return outs;
  }

  torch::Tensor attention(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor& first_pool, torch::Tensor& second_pool, const torch::Tensor& write_slots,
                          const torch::Tensor& read_slots, const torch::Tensor& mask, const RowRule& rule) const {
    const auto parts = input_products(h, rule);
    if (!mla) {  // GroupedQueryAttention.forward with the fused q/k/v
      const auto query_key = rope(parts[0].unflatten(-1, {heads + kv_heads, head_dim}), cos, sin, false);
      const auto split = query_key.split_with_sizes({heads, kv_heads}, 2);
      const auto value = parts[1].unflatten(-1, {kv_heads, head_dim});
      first_pool.index_copy_(0, write_slots, split[1].flatten(0, 1).to(first_pool.scalar_type()));
      second_pool.index_copy_(0, write_slots, value.flatten(0, 1).to(second_pool.scalar_type()));
      return o(gqa_decode_attention(split[0], first_pool, second_pool, read_slots, mask, scale).flatten(2), rule);
    }
    // MultiHeadLatentAttention.forward -> attend_from_pool
    auto q = q_norm.has_value() ? q_b(rms_norm(parts[0], *q_norm, q_eps), rule) : parts[0];
    const auto q_split = q.unflatten(-1, {heads, -1}).split_with_sizes({nope, rope_dim}, -1);
    const auto q_pe = rope(q_split[1], cos, sin, interleaved);
    const auto kv_type = parts[1].scalar_type();
    if (first_pool.scalar_type() == kv_type && second_pool.scalar_type() == kv_type && kv_norm.scalar_type() == kv_type &&
        parts[1].stride(-1) == 1) {
      mla_cache_write(parts[1], kv_norm, kv_eps, cos, sin, interleaved, first_pool, second_pool, write_slots);
    } else {
      const auto kv_split = parts[1].split_with_sizes({kv_rank, rope_dim}, -1);
      const auto latent = rms_norm(kv_split[0], kv_norm, kv_eps);
      const auto k_pe = rope(kv_split[1], cos, sin, interleaved);
      first_pool.index_copy_(0, write_slots, latent.flatten(0, 1).to(first_pool.scalar_type()));
      second_pool.index_copy_(0, write_slots, k_pe.flatten(0, 1).to(second_pool.scalar_type()));
    }
    const auto out = mla_decode_attention(q_split[0], q_pe, first_pool, second_pool, read_slots, mask, w_uk, w_uv_t, scale);
    return o(out.flatten(2), rule);
  }

  torch::Tensor swiglu(const torch::Tensor& x, const RowRule& rule) const {
    return down(silu_and_mul(gate_up(x, rule)), rule);
  }

  // (the layer's output [b, s, D], the routed experts' indices [b * s, k] or an undefined tensor)
  std::tuple<torch::Tensor, c10::optional<torch::Tensor>> forward(
      const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor first_pool,
      torch::Tensor second_pool, const torch::Tensor& write_slots, const torch::Tensor& read_slots,
      const torch::Tensor& mask, const RowRule& rule) const {
    const auto h = rms_norm(x, input_norm, input_eps);
    const auto residual =
        x + attention(h, cos, sin, first_pool, second_pool, write_slots, read_slots, mask, rule);
    const auto hidden = rms_norm(residual, post_norm, post_eps);
    if (!moe) return {residual + swiglu(hidden, rule), c10::nullopt};
    // MoE.forward: router, routed experts (the fused kernel), shared experts
    const auto flat = hidden.reshape({-1, hidden.size(-1)});
    const auto logits = router_logits(flat.to(at::kFloat), router.to(at::kFloat));
    const auto routing = route(logits, router_bias, sigmoid, n_group, topk_group, group_top2, top_k, normalize, scaling);
    auto out = routed_experts(flat, stack_gate_up, stack_down, routing[1], routing[0], stack_gate_up_scale,
                              stack_down_scale, stack_gate_up_panels, stack_down_panels).view(hidden.sizes());
    if (has_mlp) out = out + swiglu(hidden, rule);
    return {residual + out, routing[1]};
  }
};

// The decoder layers of a decode step one after the other (decode_layer.fused_decode_stack): layer i
// reads and writes first_pools[i] / second_pools[i]. Returns the last output and each layer's routed
// indices (None for a dense layer).
std::tuple<torch::Tensor, std::vector<c10::optional<torch::Tensor>>> decode_layers(
    const std::vector<const DecodeLayer*>& layers, torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
    std::vector<torch::Tensor> first_pools, std::vector<torch::Tensor> second_pools, const torch::Tensor& write_slots,
    const torch::Tensor& read_slots, const torch::Tensor& mask, int64_t few_from, int64_t few_to, int64_t onednn_from) {
  TORCH_CHECK(first_pools.size() == layers.size() && second_pools.size() == layers.size(),
              "decode_layers: one pair of pools per layer");
  const RowRule rule{few_from, few_to, onednn_from};
  std::vector<c10::optional<torch::Tensor>> indices;
  indices.reserve(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    auto [out, routed] = layers[i]->forward(x, cos, sin, first_pools[i], second_pools[i], write_slots, read_slots, mask, rule);
    x = std::move(out);
    indices.push_back(std::move(routed));
  }
  return {x, indices};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm with HF's roundings");
  m.def("silu_and_mul", &silu_and_mul, "silu(x[..., :n]) * x[..., n:]");
  m.def("panel_linear", &panel_linear, "F.linear with the fp32 weight in panels of 32 outputs (packing.pack_panels)",
        py::arg("x"), py::arg("panels"), py::arg("out_features"), py::arg("bias") = py::none());
  m.def("rows_linear", &rows_linear, "F.linear for the few rows of a decode step (fp32), weight streamed once",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("int8_linear", &int8_linear, "int8 weight-only linear (packed kernel) with its casts");
  m.def("mla_decode_attention", &mla_decode_attention, "MLA absorbed attention for a few queries");
  m.def("gqa_decode_attention", &gqa_decode_attention, "grouped-query attention for a few queries over the pool");
  m.def("rope", &rope, "rotary embedding, interleaved pairs or halves");
  m.def("mla_cache_write", &mla_cache_write, "MLA's normalized latent and rotated rope key into the pool rows of a step");
  m.def("router_logits", &router_logits, "a MoE router's fp32 logits (few tokens: rows_linear's kernel)");
  m.def("route", &route, "DeepSeek MoE routing from fp32 router logits");
  m.def("argmax", &argmax, "first maximum over the last dimension");
  m.def("rms_norm_backward", &rms_norm_backward, "gradients of F.rms_norm (fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up, or with grad its gradients", py::arg("gate"), py::arg("up"), py::arg("grad") = py::none());
  m.def("token_logprobs", &token_logprobs, "per-token log-probs, entropy and (in place) the logits' gradient");
  m.def("causal_attention_forward", &causal_attention_forward, "causal self-attention (fp32) and its log-sum-exp",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("starts") = py::none(),
        py::arg("prefix") = py::none());
  m.def("causal_attention_backward", &causal_attention_backward, "gradients of causal_attention_forward",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("scale"),
        py::arg("starts") = py::none(), py::arg("prefix") = py::none());
  m.def("sample_rows", &sample_rows, "temperature sampling: softmax, inverse-CDF draw and the chosen log-prob per row");
  m.def("inverse_cdf", &inverse_cdf, "inverse-CDF draw per row: first position whose fp64 cumulative sum exceeds u * total");
  m.def("routed_experts", &routed_experts, "a routed-experts layer, each used expert streamed once by torch's threads",
        py::arg("x"), py::arg("gate_up"), py::arg("down"), py::arg("indices"), py::arg("weights"),
        py::arg("gate_up_scale") = py::none(), py::arg("down_scale") = py::none(),
        py::arg("gate_up_panels") = py::none(), py::arg("down_panels") = py::none());
  py::class_<Product>(m, "Product")
      .def(py::init([](int64_t kind, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                       c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> plain, int64_t panel_rows) {
             TORCH_CHECK(kind != 4 || plain.has_value(), "Product: panels need their plain weight");
             return Product{kind, weight, bias, scale, plain, panel_rows};
           }),
           py::arg("kind"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("scale") = py::none(),
           py::arg("plain") = py::none(), py::arg("panel_rows") = 0)
      .def("__call__",
           [](const Product& product, const torch::Tensor& x, int64_t few_from, int64_t few_to, int64_t onednn_from) {
             return product(x, RowRule{few_from, few_to, onednn_from});
           },
           py::arg("x"), py::arg("few_from") = 1, py::arg("few_to") = 0,
           py::arg("onednn_from") = std::numeric_limits<int64_t>::max());
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<>())
      .def_readwrite("input_norm", &DecodeLayer::input_norm)
      .def_readwrite("post_norm", &DecodeLayer::post_norm)
      .def_readwrite("input_eps", &DecodeLayer::input_eps)
      .def_readwrite("post_eps", &DecodeLayer::post_eps)
      .def_readwrite("mla", &DecodeLayer::mla)
      .def_readwrite("fused_input", &DecodeLayer::fused_input)
      .def_readwrite("inputs", &DecodeLayer::inputs)
      .def_readwrite("input_sizes", &DecodeLayer::input_sizes)
      .def_readwrite("q_norm", &DecodeLayer::q_norm)
      .def_readwrite("q_eps", &DecodeLayer::q_eps)
      .def_readwrite("kv_eps", &DecodeLayer::kv_eps)
      .def_readwrite("scale", &DecodeLayer::scale)
      .def_readwrite("q_b", &DecodeLayer::q_b)
      .def_readwrite("kv_norm", &DecodeLayer::kv_norm)
      .def_readwrite("w_uk", &DecodeLayer::w_uk)
      .def_readwrite("w_uv_t", &DecodeLayer::w_uv_t)
      .def_readwrite("heads", &DecodeLayer::heads)
      .def_readwrite("nope", &DecodeLayer::nope)
      .def_readwrite("rope_dim", &DecodeLayer::rope_dim)
      .def_readwrite("kv_rank", &DecodeLayer::kv_rank)
      .def_readwrite("kv_heads", &DecodeLayer::kv_heads)
      .def_readwrite("head_dim", &DecodeLayer::head_dim)
      .def_readwrite("interleaved", &DecodeLayer::interleaved)
      .def_readwrite("o", &DecodeLayer::o)
      .def_readwrite("moe", &DecodeLayer::moe)
      .def_readwrite("has_mlp", &DecodeLayer::has_mlp)
      .def_readwrite("gate_up", &DecodeLayer::gate_up)
      .def_readwrite("down", &DecodeLayer::down)
      .def_readwrite("router", &DecodeLayer::router)
      .def_readwrite("router_bias", &DecodeLayer::router_bias)
      .def_readwrite("sigmoid", &DecodeLayer::sigmoid)
      .def_readwrite("group_top2", &DecodeLayer::group_top2)
      .def_readwrite("normalize", &DecodeLayer::normalize)
      .def_readwrite("n_group", &DecodeLayer::n_group)
      .def_readwrite("topk_group", &DecodeLayer::topk_group)
      .def_readwrite("top_k", &DecodeLayer::top_k)
      .def_readwrite("scaling", &DecodeLayer::scaling)
      .def_readwrite("stack_gate_up", &DecodeLayer::stack_gate_up)
      .def_readwrite("stack_down", &DecodeLayer::stack_down)
      .def_readwrite("stack_gate_up_scale", &DecodeLayer::stack_gate_up_scale)
      .def_readwrite("stack_down_scale", &DecodeLayer::stack_down_scale)
      .def_readwrite("stack_gate_up_panels", &DecodeLayer::stack_gate_up_panels)
      .def_readwrite("stack_down_panels", &DecodeLayer::stack_down_panels)
      .def("__call__", [](const DecodeLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin, torch::Tensor first_pool, torch::Tensor second_pool,
                          const torch::Tensor& write_slots, const torch::Tensor& read_slots, const torch::Tensor& mask,
                          int64_t few_from, int64_t few_to, int64_t onednn_from) {
        return layer.forward(x, cos, sin, first_pool, second_pool, write_slots, read_slots, mask,
                             RowRule{few_from, few_to, onednn_from});
      });
  m.def("decode_layers", &decode_layers, "decoder layers of a decode step one after the other (DecodeLayer each)");
}
