// moedeploy's CPU expert kernel for decode steps: every pair's SiLU-gated expert FFN, each row reading its own
// expert's weights straight from the bank (built at first use by kernels/native.py; see its docstring).
//
//     h[p] = w_in[e_p] @ x[p]             [P, N]  float32 sums, rounded to the weights' dtype (as F.linear)
//     a[p] = silu(gate) * up              [P, I]  rounded after silu and after the product (as eager torch)
//     y[p] = w_out[e_p] @ a[p]            [P, D]
//
// over float32 or bfloat16 weights (`expert_ffn`), or int8 weights with a scale per row and group of inputs
// (`expert_ffn_int8`: quant/formats.py's int8; each group's sum is scaled, then added, all in float32).
//
// A matrix-vector product reads its weights once, so it runs at the memory's speed only if the arithmetic keeps
// up. The inner loop keeps each row's sum in two independent accumulators (a single chain of fused multiply-adds
// waits on its latency), in one of four instruction sets, the best the CPU has unless `isa` names a lower one
// (`expert_isas()` lists them, best first):
//   avx512_bf16  bfloat16 weights and inputs multiplied in pairs by the CPU's bfloat16 dot product (exact
//                products, float32 sums; inputs below 2^-126 count as zero, as the instruction does)
//   avx512       16 float32 lanes; bfloat16 read 32 at a time: a shift gives the even inputs as float32, a mask
//                the odd ones, against an input vector deinterleaved once per row (`split`)
//   avx2         the same with 8 lanes (16 bfloat16 at a time)
//   portable     plain C++ loops (a CPU without AVX2)
// Rows ahead are asked for in software (a bfloat16 row of 2048 inputs is one 4 KiB page, and the hardware's
// prefetcher stops at each page). AVX2: four rows at a time, the next four asked for where the weights are
// narrower than float32 (+10-15% on an AVX2 EPYC; float32 gained nothing). AVX-512: one row at a time, two rows
// ahead asked for (on an AVX-512 EPYC +20% over four rows at a time, and 5-7% over torch.compile's loop), as
// non-temporal (a model's decode 0-8% faster there than with T0: the 100-200 MB a layer streams evict less of
// the model's other code and data).
// Every output element is summed by one thread in a fixed order, so the bits do not depend on the thread count,
// on which rows share a step, or on where in a bank an expert sits; they do depend on the instruction set, as
// torch's own do.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

constexpr int64_t kChunk = 64;  // output rows per task handed to a thread

enum class Isa { portable, avx2, avx512, avx512_bf16 };  // in order: each runs where the next one does

const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_bf16"};

Isa best_isa() {
  static const Isa best = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::portable;
    if (!__builtin_cpu_supports("avx512f")) return Isa::avx2;
    return __builtin_cpu_supports("avx512bf16") ? Isa::avx512_bf16 : Isa::avx512;
  }();
  return best;
}

Isa isa_named(const std::string& name) {
  if (name == "best") return best_isa();
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i)
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  TORCH_CHECK(false, "expert_ffn: isa '", name, "' is not one this CPU runs; it runs: ",
              c10::Join(", ", std::vector<std::string>(kIsaNames, kIsaNames + static_cast<int>(best_isa()) + 1)));
}

template <typename W>
float round_to(float v) {
  if constexpr (std::is_same_v<W, bf16>) return static_cast<float>(bf16(v));  // round to nearest even
  return v;
}

// x [K] -> per block of B inputs, its B/2 even then its B/2 odd ones; the tail (K % B) as it is.
template <int64_t B>
void split(const float* x, float* out, int64_t K) {
  int64_t k = 0;
  for (; k + B <= K; k += B)
    for (int64_t j = 0; j < B / 2; ++j) {
      out[k + j] = x[k + 2 * j];
      out[k + B / 2 + j] = x[k + 2 * j + 1];
    }
  for (; k < K; ++k) out[k] = x[k];
}

// --- AVX2 + FMA: 16 inputs per step ------------------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2 {
  static constexpr int64_t kBlock = 16;
  static constexpr int kRows = 4;  // rows at once (eight chains in flight)
  template <typename W>
  static constexpr int64_t kAhead = std::is_same_v<W, float> ? 0 : 4;  // rows ahead to prefetch (0: none)
  static constexpr int kHint = _MM_HINT_T0;
  using V = __m256;
  __attribute__((target("avx2,fma"))) static V zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static float sum(V a, V b) { return hsum(_mm256_add_ps(a, b)); }
  // Sixteen weights of one row times the block's inputs, into the row's two accumulators.
  __attribute__((target("avx2,fma"))) static void fma(const float* w, const float* x, V& a, V& b) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), b);
  }
  __attribute__((target("avx2,fma"))) static void fma(const bf16* w, const float* x, V& a, V& b) {
    // x is split: x[0:8] the block's even inputs, x[8:16] its odd ones
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    a = _mm256_fmadd_ps(even, _mm256_loadu_ps(x), a);
    b = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 8), b);
  }
  // int8 weights, 16 at a time
  __attribute__((target("avx2,fma"))) static void fma(const int8_t* w, const float* x, V& a, V& b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_loadu_ps(x), a);
    b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v))), _mm256_loadu_ps(x + 8), b);
  }
  __attribute__((target("avx2,fma"))) static V scaled(V sum, float s, V total) {
    return _mm256_fmadd_ps(sum, _mm256_set1_ps(s), total);
  }
  __attribute__((target("avx2,fma"))) static V add(V a, V b) { return _mm256_add_ps(a, b); }
};

// --- AVX-512: 32 inputs per step ---------------------------------------------------------------------------------

struct Avx512 {
  static constexpr int64_t kBlock = 32;
  static constexpr int kRows = 1;  // one row at a time, two rows ahead asked for (see the top)
  template <typename W>
  static constexpr int64_t kAhead = 2;
  static constexpr int kHint = _MM_HINT_NTA;  // the streamed experts then evict less of the rest of the model
  using V = __m512;
  __attribute__((target("avx512f"))) static V zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static float sum(V a, V b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
  __attribute__((target("avx512f"))) static void fma(const float* w, const float* x, V& a, V& b) {
    a = _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), a);
    b = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16), _mm512_loadu_ps(x + 16), b);
  }
  __attribute__((target("avx512f"))) static void fma(const bf16* w, const float* x, V& a, V& b) {
    // x is split: x[0:16] the block's even inputs, x[16:32] its odd ones
    const __m512i v = _mm512_loadu_si512(w);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    a = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), a);
    b = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 16), b);
  }
  __attribute__((target("avx512f"))) static void fma(const int8_t* w, const float* x, V& a, V& b) {
    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)))),
                        _mm512_loadu_ps(x), a);
    b = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)))),
        _mm512_loadu_ps(x + 16), b);
  }
  __attribute__((target("avx512f"))) static V scaled(V sum, float s, V total) {
    return _mm512_fmadd_ps(sum, _mm512_set1_ps(s), total);
  }
  __attribute__((target("avx512f"))) static V add(V a, V b) { return _mm512_add_ps(a, b); }
};

// bfloat16 pairs: 32 weights times 32 inputs (both bfloat16, as the inputs are stored for this path) per
// instruction; rows, prefetching and sums as AVX-512's
struct Avx512Bf16 : Avx512 {
  static constexpr int64_t kBlock = 64;  // two instructions, one per accumulator
  __attribute__((target("avx512f,avx512bf16"))) static void fma(const bf16* w, const bf16* x, V& a, V& b) {
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
    b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(w + 32), (__m512bh)_mm512_loadu_si512(x + 32));
  }
};

// Ask for the cache lines that start in bytes [lo, hi) of `rows` rows of `stride` bytes from `next`, with the
// traits' hint (_MM_HINT_T0: into every cache level; _MM_HINT_NTA: close to the core, sparing the outer caches).
template <int Hint>
inline void prefetch(const char* next, int64_t stride, int rows, int64_t lo, int64_t hi) {
  for (int64_t c = (lo + 63) / 64 * 64; c < hi; c += 64)
    for (int i = 0; i < rows; ++i) _mm_prefetch(next + i * stride + c, static_cast<_mm_hint>(Hint));
}

// A loop written once for every instruction set's traits S: the traits' functions carry their instruction set,
// and each set's entry point below (`flatten`: everything inlined into it) compiles the loop for that set alone.

// y[n] = w[n, :] . x for n in [n0, n1); w [*, K] row-major; x as `Rows` prepared it (split, or bfloat16).
template <typename S, typename W, typename X>
void rows_simd(const W* w, const X* x, float* y, int64_t n0, int64_t n1, int64_t K) {
  constexpr int64_t B = S::kBlock, ahead = S::template kAhead<W>;
  constexpr int G = S::kRows;
  const int64_t body = K - K % B;
  for (int64_t n = n0; n < n1; n += G) {
    const int R = static_cast<int>(std::min<int64_t>(G, n1 - n));
    const W* r[G];
    for (int i = 0; i < G; ++i) r[i] = w + (n + std::min(i, R - 1)) * K;  // a short group repeats its last row
    typename S::V a[G], b[G];
    for (int i = 0; i < G; ++i) a[i] = b[i] = S::zero();
    const char* next = reinterpret_cast<const char*>(w + (n + ahead) * K);  // the rows `ahead` of these
    const bool fetch = ahead && n + ahead + G <= n1;
    for (int64_t k = 0; k < body; k += B) {
      if (fetch) prefetch<S::kHint>(next, K * sizeof(W), G, k * sizeof(W), (k + B) * sizeof(W));
      for (int i = 0; i < G; ++i) S::fma(r[i] + k, x + k, a[i], b[i]);
    }
    for (int i = 0; i < R; ++i) {
      float s = S::sum(a[i], b[i]);
      for (int64_t k = body; k < K; ++k) s += static_cast<float>(r[i][k]) * static_cast<float>(x[k]);
      y[n + i] = s;
    }
  }
}

// --- portable --------------------------------------------------------------------------------------------------

template <typename W>
void rows_portable(const W* w, const float* x, float* y, int64_t n0, int64_t n1, int64_t K) {
  constexpr int64_t B = Avx2::kBlock;
  const int64_t body = K - K % B;
  for (int64_t n = n0; n < n1; ++n) {
    const W* r = w + n * K;
    float acc[B] = {};
    for (int64_t k = 0; k < body; k += B)
      for (int j = 0; j < 8; ++j) {  // bfloat16: x is split, as in the AVX2 path
        const int64_t even = std::is_same_v<W, bf16> ? k + 2 * j : k + j;
        const int64_t odd = std::is_same_v<W, bf16> ? k + 2 * j + 1 : k + 8 + j;
        acc[j] += static_cast<float>(r[even]) * x[k + j];
        acc[8 + j] += static_cast<float>(r[odd]) * x[k + 8 + j];
      }
    float s = 0;
    for (float v : acc) s += v;
    for (int64_t k = body; k < K; ++k) s += static_cast<float>(r[k]) * x[k];
    y[n] = s;
  }
}

// --- int8 weights, one scale per (row, group of g inputs): y[n] = sum over groups of s[n, j] * (q[n, j] . x[j]) ----

template <typename S, typename Sc>
void int8_simd(const int8_t* q, const Sc* s, int64_t G, const float* x, float* y, int64_t n0, int64_t n1, int64_t K) {
  constexpr int64_t B = S::kBlock, ahead = S::template kAhead<int8_t>;
  constexpr int Rows = S::kRows;
  const int64_t g = K / G;  // a multiple of B here
  for (int64_t n = n0; n < n1; n += Rows) {
    const int R = static_cast<int>(std::min<int64_t>(Rows, n1 - n));
    const int8_t* r[Rows];
    const Sc* sc[Rows];
    for (int i = 0; i < Rows; ++i) {
      r[i] = q + (n + std::min(i, R - 1)) * K;
      sc[i] = s + (n + std::min(i, R - 1)) * G;
    }
    const int8_t* next = q + (n + ahead) * K;
    const bool fetch = ahead && n + ahead + Rows <= n1;
    typename S::V tot[Rows];
    for (int i = 0; i < Rows; ++i) tot[i] = S::zero();
    for (int64_t j = 0; j < G; ++j) {
      typename S::V a[Rows], b[Rows];
      for (int i = 0; i < Rows; ++i) a[i] = b[i] = S::zero();
      for (int64_t k = j * g; k < (j + 1) * g; k += B) {
        if (fetch) prefetch<S::kHint>(reinterpret_cast<const char*>(next), K, Rows, k, k + B);
        for (int i = 0; i < Rows; ++i) S::fma(r[i] + k, x + k, a[i], b[i]);
      }
      for (int i = 0; i < Rows; ++i) tot[i] = S::scaled(S::add(a[i], b[i]), static_cast<float>(sc[i][j]), tot[i]);
    }
    for (int i = 0; i < R; ++i) y[n + i] = S::sum(tot[i], S::zero());
  }
}

template <typename Sc>
void int8_portable(const int8_t* q, const Sc* s, int64_t G, const float* x, float* y, int64_t n0, int64_t n1,
                   int64_t K) {
  const int64_t g = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    float total = 0;
    for (int64_t j = 0; j < G; ++j) {
      float acc = 0;
      for (int64_t k = j * g; k < (j + 1) * g; ++k) acc += static_cast<float>(q[n * K + k]) * x[k];
      total += acc * static_cast<float>(s[n * G + j]);
    }
    y[n] = total;
  }
}

// --- each instruction set's entry points --------------------------------------------------------------------------

template <typename W>
__attribute__((target("avx2,fma"), flatten)) void rows_avx2(const W* w, const float* x, float* y, int64_t n0,
                                                            int64_t n1, int64_t K) {
  rows_simd<Avx2>(w, x, y, n0, n1, K);
}

template <typename W>
__attribute__((target("avx512f"), flatten)) void rows_avx512(const W* w, const float* x, float* y, int64_t n0,
                                                             int64_t n1, int64_t K) {
  rows_simd<Avx512>(w, x, y, n0, n1, K);
}

__attribute__((target("avx512f,avx512bf16"), flatten)) void rows_dot(const bf16* w, const bf16* x, float* y,
                                                                     int64_t n0, int64_t n1, int64_t K) {
  rows_simd<Avx512Bf16>(w, x, y, n0, n1, K);
}

template <typename Sc>
__attribute__((target("avx2,fma"), flatten)) void int8_avx2(const int8_t* q, const Sc* s, int64_t G, const float* x,
                                                            float* y, int64_t n0, int64_t n1, int64_t K) {
  int8_simd<Avx2>(q, s, G, x, y, n0, n1, K);
}

template <typename Sc>
__attribute__((target("avx512f"), flatten)) void int8_avx512(const int8_t* q, const Sc* s, int64_t G, const float* x,
                                                             float* y, int64_t n0, int64_t n1, int64_t K) {
  int8_simd<Avx512>(q, s, G, x, y, n0, n1, K);
}

// --- projections: rows [n0, n1) of expert e's matrix [N, K] times x, x as `prepare` left it ---------------------

template <typename W>
struct FloatRows {
  const W* w;
  Isa isa;
  // One input row, in float32, as this path reads it: split for bfloat16 in float lanes, bfloat16 for the dot
  // product (stored in the row's float32 buffer, which has room), as it is otherwise.
  void prepare(const float* row, float* out, int64_t K) const {
    if constexpr (std::is_same_v<W, bf16>) {
      if (isa == Isa::avx512_bf16) {
        bf16* o = reinterpret_cast<bf16*>(out);
        for (int64_t k = 0; k < K; ++k) o[k] = bf16(row[k]);  // exact: the row holds bfloat16 values
      } else if (isa == Isa::avx512) {
        split<Avx512::kBlock>(row, out, K);
      } else {
        split<Avx2::kBlock>(row, out, K);
      }
    } else {
      std::copy(row, row + K, out);
    }
  }
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    const W* we = w + e * N * K;
    if constexpr (std::is_same_v<W, bf16>) {
      if (isa == Isa::avx512_bf16) return rows_dot(we, reinterpret_cast<const bf16*>(x), y, n0, n1, K);
    }
    if (isa >= Isa::avx512) return rows_avx512<W>(we, x, y, n0, n1, K);
    if (isa == Isa::avx2) return rows_avx2<W>(we, x, y, n0, n1, K);
    rows_portable<W>(we, x, y, n0, n1, K);
  }
};

template <typename Sc>
struct Int8Rows {
  const int8_t* q;
  const Sc* s;
  int64_t G;
  Isa isa;
  void prepare(const float* row, float* out, int64_t K) const { std::copy(row, row + K, out); }
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    const int8_t* qe = q + e * N * K;
    const Sc* se = s + e * N * G;
    const int64_t g = K / G;
    if (isa >= Isa::avx512 && g % Avx512::kBlock == 0) return int8_avx512<Sc>(qe, se, G, x, y, n0, n1, K);
    if (isa >= Isa::avx2 && g % Avx2::kBlock == 0) return int8_avx2<Sc>(qe, se, G, x, y, n0, n1, K);
    int8_portable<Sc>(qe, se, G, x, y, n0, n1, K);
  }
};

// Every pair's y[p] = rows of its expert @ x[p] over output rows [0, N), in tasks of kChunk rows across threads.
template <typename Rows>
void gemv(const Rows& rows, const int64_t* expert, const float* x, float* y, int64_t P, int64_t N, int64_t K) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, P * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / chunks, n0 = (t % chunks) * kChunk, n1 = std::min(N, n0 + kChunk);
      rows(expert[p], x + p * K, y + p * N, n0, n1, N, K);
    }
  });
}

// The FFN of every pair, X the dtype of x, of the outputs and of the roundings (as eager torch in that dtype).
template <typename X, typename Rows>
at::Tensor ffn(const at::Tensor& x, const at::Tensor& expert, const Rows& in, const Rows& out, int64_t N) {
  const int64_t P = x.size(0), D = x.size(1), I = N / 2;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xs = at::empty({P, D}, f32), h = at::empty({P, N}, f32), a = at::empty({P, I}, f32),
             y = at::empty({P, D}, f32);
  const X* xw = reinterpret_cast<const X*>(x.data_ptr());
  float *xp = xs.data_ptr<float>(), *hp = h.data_ptr<float>(), *ap = a.data_ptr<float>(), *yp = y.data_ptr<float>();
  std::vector<float> row(std::max(D, I));
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(xw[p * D + d]);
    in.prepare(row.data(), xp + p * D, D);
  }
  const int64_t* ex = expert.data_ptr<int64_t>();
  gemv(in, ex, xp, hp, P, N, D);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < I; ++i) {
      const float gate = round_to<X>(hp[p * N + i]), up = round_to<X>(hp[p * N + I + i]);
      row[i] = round_to<X>(round_to<X>(gate / (1.0f + std::exp(-gate))) * up);
    }
    out.prepare(row.data(), ap + p * I, I);
  }
  gemv(out, ex, ap, yp, P, D, I);
  return y.to(x.scalar_type());
}

// x [P, D] and one expert per row, each one of the bank's E (a bad id would read outside the weights)
void check_rows(const at::Tensor& x, const at::Tensor& expert, int64_t E) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "expert_ffn: x must be a contiguous CPU [P, D]");
  TORCH_CHECK(expert.dim() == 1 && expert.is_contiguous() && expert.scalar_type() == at::kLong &&
                  expert.size(0) == x.size(0),
              "expert_ffn: one int64 expert per row");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "expert_ffn takes float32 or bfloat16");
  const int64_t* e = expert.data_ptr<int64_t>();
  for (int64_t p = 0; p < expert.size(0); ++p)
    TORCH_CHECK(e[p] >= 0 && e[p] < E, "expert_ffn: row ", p, " names expert ", e[p], "; the bank holds ", E);
}

void check_weights(const at::Tensor& w, int64_t E, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3, "expert_ffn: ", what,
              " must be a contiguous CPU [E, N, K]");
  TORCH_CHECK(w.size(0) == E && w.size(1) == N && w.size(2) == K, "expert_ffn: ", what, " has shape ", w.sizes(),
              ", expected [", E, ", ", N, ", ", K, "]");
}

// isa: "best", or one of expert_isas() to run a lower one (tests run each)
at::Tensor expert_ffn(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& w_in,
                      const at::Tensor& w_out, c10::string_view isa_name) {
  const int64_t E = w_in.size(0), D = x.size(1), N = w_in.size(1);
  check_rows(x, expert, E);
  TORCH_CHECK(N % 2 == 0, "expert_ffn: gated experts have an even first projection");
  check_weights(w_in, E, N, D, "w_in");
  check_weights(w_out, E, D, N / 2, "w_out");
  TORCH_CHECK(x.scalar_type() == w_in.scalar_type() && w_in.scalar_type() == w_out.scalar_type(),
              "expert_ffn: x and the weights must share a dtype");
  const Isa isa = isa_named(std::string(isa_name));
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, FloatRows<bf16>{w_in.data_ptr<bf16>(), isa},
                     FloatRows<bf16>{w_out.data_ptr<bf16>(), isa}, N);
  return ffn<float>(x, expert, FloatRows<float>{w_in.data_ptr<float>(), isa},
                    FloatRows<float>{w_out.data_ptr<float>(), isa}, N);
}

// int8 experts: q [E, N, K] int8 and s [E, N, G] scales in x's dtype, for each projection.
at::Tensor expert_ffn_int8(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& q_in,
                           const at::Tensor& s_in, const at::Tensor& q_out, const at::Tensor& s_out,
                           c10::string_view isa_name) {
  const int64_t E = q_in.size(0), D = x.size(1), N = q_in.size(1), I = N / 2;
  check_rows(x, expert, E);
  TORCH_CHECK(N % 2 == 0, "expert_ffn_int8: gated experts have an even first projection");
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_out.scalar_type() == at::kChar, "expert_ffn_int8: int8 weights");
  check_weights(q_in, E, N, D, "q_in");
  check_weights(q_out, E, D, I, "q_out");
  const int64_t G_in = s_in.size(2), G_out = s_out.size(2);
  check_weights(s_in, E, N, G_in, "s_in");
  check_weights(s_out, E, D, G_out, "s_out");
  TORCH_CHECK(G_in > 0 && G_out > 0 && D % G_in == 0 && I % G_out == 0, "expert_ffn_int8: groups must divide the inputs");
  TORCH_CHECK(s_in.scalar_type() == x.scalar_type() && s_out.scalar_type() == x.scalar_type(),
              "expert_ffn_int8: scales in x's dtype");
  const Isa isa = isa_named(std::string(isa_name));
  const int8_t *qi = q_in.data_ptr<int8_t>(), *qo = q_out.data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, Int8Rows<bf16>{qi, s_in.data_ptr<bf16>(), G_in, isa},
                     Int8Rows<bf16>{qo, s_out.data_ptr<bf16>(), G_out, isa}, N);
  return ffn<float>(x, expert, Int8Rows<float>{qi, s_in.data_ptr<float>(), G_in, isa},
                    Int8Rows<float>{qo, s_out.data_ptr<float>(), G_out, isa}, N);
}

std::vector<std::string> expert_isas() {  // best first
  std::vector<std::string> names;
  for (int i = static_cast<int>(best_isa()); i >= 0; --i) names.emplace_back(kIsaNames[i]);
  return names;
}

}  // namespace

TORCH_LIBRARY(moedeploy, m) {
  m.def("expert_ffn(Tensor x, Tensor expert, Tensor w_in, Tensor w_out, str isa='best') -> Tensor");
  m.impl("expert_ffn", c10::DispatchKey::CPU, TORCH_FN(expert_ffn));
  m.def("expert_ffn_int8(Tensor x, Tensor expert, Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out, "
        "str isa='best') -> Tensor");
  m.impl("expert_ffn_int8", c10::DispatchKey::CPU, TORCH_FN(expert_ffn_int8));
  m.def("expert_isas() -> str[]", &expert_isas);
}
