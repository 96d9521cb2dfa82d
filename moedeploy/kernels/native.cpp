// moedeploy's CPU expert kernel for decode steps (and every step of quantized experts on its integer path): every
// pair's SiLU-gated expert FFN, each row reading its own expert's weights straight from the bank (built at first use by kernels/native.py; see its docstring).
//
//     h[p] = w_in[e_p] @ x[p]             [P, N]  float32 sums, rounded to the weights' dtype (as F.linear)
//     a[p] = silu(gate) * up              [P, I]  rounded after silu and after the product (as eager torch)
//     y[p] = w_out[e_p] @ a[p]            [P, D]
//
// over float32 or bfloat16 weights (`expert_ffn`), or int8 weights with a scale per row and group of inputs
// (`expert_ffn_int8`: quant/formats.py's int8; each group's sum is scaled, then added, all in float32), or int4
// weights in the "plain" layout (`expert_ffn_int4`). On a CPU with AVX2 the quantized experts multiply
// int8-quantized inputs instead (the integer paths, below). The float paths also run decode-sized dense projections
// (`linear_rows`, kernels/dense.py).
//
// A matrix-vector product reads its weights once, so it runs at the memory's speed only if the arithmetic keeps
// up. The inner loop keeps each row's sum in two independent accumulators (a single chain of fused multiply-adds
// waits on its latency), in one of these instruction sets, the best the CPU has unless `isa` names a lower one
// (`expert_isas()` lists them, best first):
//   avx512_bf16  bfloat16 weights and inputs multiplied in pairs by the CPU's bfloat16 dot product (exact
//                products, float32 sums; inputs below 2^-126 count as zero, as the instruction does)
//   avx512       16 float32 lanes; bfloat16 read 32 at a time: a shift gives the even inputs as float32, a mask
//                the odd ones, against an input vector deinterleaved once per row (`split`)
//   avx2         the same with 8 lanes (16 bfloat16 at a time)
//   portable     plain C++ loops (a CPU without AVX2)
//   avx512_vnni  quantized experts only: the integer path (int8 or int4 weights times int8 inputs)
//   avx2_int8    the same on any AVX2 CPU (32 products per instruction pair instead of 64 per instruction)
// Rows ahead are asked for in software (a bfloat16 row of 2048 inputs is one 4 KiB page, and the hardware's
// prefetcher stops at each page). AVX2: four rows at a time, the next four asked for where the weights are
// narrower than float32 (+10-15% on an AVX2 EPYC; float32 gained nothing). AVX-512: two rows at a time, the two
// after them asked for (on an AVX-512 EPYC one row at a time was +20% over four, and 5-7% over torch.compile's
// loop; on an AVX-512 Xeon two rows read cold experts 5-13% faster than one, medians of three runs: bfloat16
// 13.3 against 11.8 GB/s at 1 thread, float32 12.9 / 25.1 against 12.3 / 23.8 GB/s at 1 / 2 threads).
// Every prefetch is T0 (into every cache level): non-temporal ones made a decode 0-8% faster on the AVX-512
// EPYC, but on an AVX-512 Xeon (Emerald Rapids) cut this kernel's reads to a third, cold or from the L3 (on the
// AVX2 EPYC, int4 experts: within the noise).
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

// Float paths, in order (each runs where the next one does), then the quantized experts' integer paths.
enum class Isa { portable, avx2, avx512, avx512_bf16, avx2_int8, avx512_vnni };

const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_bf16", "avx2_int8", "avx512_vnni"};

bool runs(Isa isa) {
  switch (isa) {
    case Isa::portable: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512: return runs(Isa::avx2) && __builtin_cpu_supports("avx512f");
    case Isa::avx512_bf16: return runs(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::avx2_int8: return runs(Isa::avx2);
    case Isa::avx512_vnni:
      return runs(Isa::avx512) && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

bool integer(Isa isa) { return isa == Isa::avx2_int8 || isa == Isa::avx512_vnni; }

// The float path that runs where an integer one does not apply (shapes it does not take).
Isa floats(Isa isa) {
  if (isa == Isa::avx512_vnni) return Isa::avx512;
  return isa == Isa::avx2_int8 ? Isa::avx2 : isa;
}

std::vector<std::string> expert_isas() {  // best first
  std::vector<std::string> names;
  for (int i = static_cast<int>(Isa::avx512_vnni); i >= 0; --i)
    if (runs(static_cast<Isa>(i))) names.emplace_back(kIsaNames[i]);
  return names;
}

// "best": the best float path, or for quantized experts the best integer one.
Isa isa_named(const std::string& name, bool quantized) {
  if (name == "best") {
    if (quantized)
      for (Isa isa : {Isa::avx512_vnni, Isa::avx2_int8})
        if (runs(isa)) return isa;
    for (int i = static_cast<int>(Isa::avx512_bf16); i > 0; --i)
      if (runs(static_cast<Isa>(i))) return static_cast<Isa>(i);
    return Isa::portable;
  }
  for (int i = 0; i <= static_cast<int>(Isa::avx512_vnni); ++i)
    if (name == kIsaNames[i] && runs(static_cast<Isa>(i))) {
      TORCH_CHECK(quantized || !integer(static_cast<Isa>(i)), "expert_ffn: isa '", name,
                  "' multiplies quantized experts; float experts run the others");
      return static_cast<Isa>(i);
    }
  TORCH_CHECK(false, "expert_ffn: isa '", name, "' is not one this CPU runs; it runs: ", c10::Join(", ", expert_isas()));
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
  static constexpr int kRows = 2;  // two rows at a time, the next two asked for (see the top)
  template <typename W>
  static constexpr int64_t kAhead = 2;
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

// Ask for the cache lines that start in bytes [lo, hi) of `rows` rows of `stride` bytes from `next`, into every
// cache level (T0; see the top).
inline void prefetch(const char* next, int64_t stride, int rows, int64_t lo, int64_t hi) {
  for (int64_t c = (lo + 63) / 64 * 64; c < hi; c += 64)
    for (int i = 0; i < rows; ++i) _mm_prefetch(next + i * stride + c, _MM_HINT_T0);
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
      if (fetch) prefetch(next, K * sizeof(W), G, k * sizeof(W), (k + B) * sizeof(W));
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
        if (fetch) prefetch(reinterpret_cast<const char*>(next), K, Rows, k, k + B);
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

// --- quantized experts times quantized inputs: the integer paths --------------------------------------------------
//
// The products of int8 or int4 weights with int8 inputs, summed in int32, as llama.cpp's Q8_0 and Q4 dot products
// are. Each input row is quantized per block of 32 inputs, d = max|x| / 127 and xq = round(x / d) (quant/formats.py
// `quantize_inputs` is the reference), and a row's sum is, in float32,
//     sum over groups j of s[j] * (sum over the group's blocks b of d[b] * (q . xq)[b])   (+ int4's zero term)
// int4's "plain" nibbles are unsigned codes (0..15): w = q * s + (zero - 8 s), so a row also adds sum over groups
// of (zero - 8 s) * (the group's sum of d * xq). A step is 64 inputs, two blocks; each int32 lane of its sums holds
// inputs of one block, and is scaled by that block's d. Every group is 32 inputs or a multiple of 64.
//   avx512_vnni  vpdpbusd: unsigned bytes times signed bytes, summed in fours into 16 int32 lanes, the whole step in
//                one instruction. int8: q + 128 is the unsigned operand (one xor); the 128 * xq it adds is taken
//                off by starting each sum at -128 * (the lane's inputs' sum), kept with the prepared row.
//   avx2_int8    vpmaddubsw (unsigned bytes times signed bytes, summed in pairs into int16), then vpmaddwd by ones
//                (int16 pairs into int32), as llama.cpp's AVX2 dot products. int8: |q| is the unsigned operand and
//                xq takes q's sign (2 * 128 * 127 < 2^15: no int16 sum saturates), a step's two blocks' lanes
//                folded into one vector; int4: the two int16 sums of a byte pair's nibbles added before widening
//                (2 * 2 * 15 * 127 < 2^15).
// int4's step unpacks the low nibbles (even inputs) and the high ones (odd inputs) of 32 bytes, so its inputs are
// stored per step as the 32 even ones, then the 32 odd ones. The lanes of a step's second block: int8 8-15 (bytes
// in order) with AVX-512, 4-7 with AVX2; int4 4-7 and 12-15 with AVX-512, 4-7 with AVX2.

constexpr int64_t kVec = 64;     // inputs per step
constexpr int64_t kXBlock = 32;  // inputs per input scale

// One input row, prepared in the row's float32 buffer (4K bytes; this takes 3K + 4G):
struct QInput {
  int8_t* q;      // [K] xq, in the weights' byte order (int4: per 64 inputs, the even ones then the odd ones)
  int32_t* bias;  // [K / 64, 16] int8 with AVX-512: -128 * the sum of each lane's four xq
  float* d;       // [K / 64, lanes] each lane's d
  float* sum;     // [G] int4: each group's d * xq summed, in float32
};

QInput input_view(const float* buffer, int64_t K) {
  char* b = const_cast<char*>(reinterpret_cast<const char*>(buffer));
  return {reinterpret_cast<int8_t*>(b), reinterpret_cast<int32_t*>(b + K), reinterpret_cast<float*>(b + 2 * K),
          reinterpret_cast<float*>(b + 3 * K)};
}

// Each instruction set's part of the integer path: a block's quantization (`quantize_block`: one block of 32
// inputs, q = round(x / d), half to even as torch.round, clamped to +-127, d = max|x| / 127, 0 and q = 0 for a block
// of zeros; returns d and the q's sum; vectorised, the same arithmetic and bits as one input at a time through
// libm's nearbyintf, which took 261 against 205 us for 8 pairs of 2048 inputs with small experts), a step's stores
// into the prepared row (`store`), its weights (`codes`), their products with a prepared row's step (`dot`), the
// group scales across its lanes (`halves`), and the float32 arithmetic of the sums. Each weight kind's codes have
// their own type, which picks its dot.

struct Vnni512 {
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 4;                // rows at once: the input's loads shared, four sums in flight
  static constexpr int64_t kAheadBytes = 8192;  // how far ahead the weights are asked for (two 4 KiB pages)
  struct Q8 { __m512i u; };  // int8 weights, as the unsigned operand
  struct Q4 { __m512i u; };  // int4 codes, unpacked to bytes
  struct In {                // a step of a prepared row
    __m512i q;
    const int32_t* bias;
  };
  __attribute__((target("avx512f"))) static __m512i round_codes(__m512 x, __m512 d) {
    const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(x, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f)));
  }
  __attribute__((target("avx512f,avx512bw"))) static float quantize_block(const float* xb, int8_t* q, int32_t& total) {
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.0f;
    if (!(d > 0)) {
      std::fill(q, q + kXBlock, int8_t{0});
      total = 0;
      return d > 0 ? d : 0.0f;
    }
    const __m512 vd = _mm512_set1_ps(d);
    const __m512i qa = round_codes(a, vd), qb = round_codes(b, vd);
    total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
    return d;
  }
  // a step's 64 codes q (inputs in order) and its blocks' d into the prepared row
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void store(const int8_t* q, const float* d,
                                                                          bool nibbles, const QInput& in, int64_t k) {
    int8_t* out = in.q + k;
    const __m512i v = _mm512_loadu_si512(q);
    const int64_t b = k / kVec;
    if (nibbles) {  // bytes 0-31 the even inputs, 32-63 the odd ones
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi16_epi8(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kVec / 2), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
      _mm512_storeu_ps(in.d + 16 * b, _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1])));
      return;  // int4's unsigned operand is the codes themselves: no bias
    }
    _mm512_storeu_si512(out, v);
    _mm512_storeu_ps(in.d + 16 * b, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1])));
    // each lane's four xq summed (ones as the unsigned operand), times -128
    const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), v);
    _mm512_storeu_si512(in.bias + 16 * b, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128)));
  }
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static Q8 codes(const int8_t* r, int64_t k) {
    return {_mm512_xor_si512(_mm512_loadu_si512(r + k), _mm512_set1_epi8(static_cast<char>(0x80)))};
  }
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static Q4 codes(const uint8_t* r, int64_t k) {
    const __m512i c = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k / 2)));
    return {_mm512_and_si512(_mm512_srlv_epi64(c, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F))};
  }
  __attribute__((target("avx512f"))) static In input(const QInput& x, int64_t k) {
    return {_mm512_loadu_si512(x.q + k), x.bias + k / 4};
  }
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static __m512i dot(Q8 v, const In& x) {
    return _mm512_dpbusd_epi32(_mm512_loadu_si512(x.bias), v.u, x.q);
  }
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static __m512i dot(Q4 v, const In& x) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), v.u, x.q);
  }
  __attribute__((target("avx512f"))) static F halves(Q8, float s0, float s1) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
  }
  __attribute__((target("avx512f"))) static F halves(Q4, float s0, float s1) {
    return _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
  }
  __attribute__((target("avx512f"))) static F zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static F set1(float v) { return _mm512_set1_ps(v); }
  __attribute__((target("avx512f"))) static F load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static F to_float(__m512i v) { return _mm512_cvtepi32_ps(v); }
  __attribute__((target("avx512f"))) static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  __attribute__((target("avx512f"))) static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // 16 (scale, zero) bfloat16 pairs, as float32
  __attribute__((target("avx512f"))) static void pairs(const bf16* z, F& scale, F& zero) {
    const __m512i v = _mm512_loadu_si512(z);
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    zero = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  __attribute__((target("avx512f"))) static float sum(F v) { return _mm512_reduce_add_ps(v); }
};

struct Avx2Int8 {
  using F = __m256;
  static constexpr int kLanes = 8;
  // One row at a time, read front to back, its line 4 KiB ahead asked for: on an AVX2 EPYC (Zen 3) cold int4 rows
  // read at 14-15 GB/s this way against 10-11 interleaving four rows (whatever the prefetching: a stand-alone loop)
  static constexpr int kRows = 1;
  static constexpr int64_t kAheadBytes = 4096;
  struct Q8 { __m256i a, b; };       // int8 weights of the step's two blocks
  struct Q4 { __m256i even, odd; };  // int4 codes as bytes: the step's even inputs, its odd ones
  struct In { __m256i a, b; };       // a step of a prepared row: its two halves
  __attribute__((target("avx2,fma"))) static __m256i round_codes(__m256 x, __m256 d) {
    const __m256 v = _mm256_round_ps(_mm256_div_ps(x, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
  }
  __attribute__((target("avx2,fma"))) static float quantize_block(const float* xb, int8_t* q, int32_t& total) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 x[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      x[i] = _mm256_loadu_ps(xb + 8 * i);
      top = _mm256_max_ps(top, _mm256_andnot_ps(sign, x[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float d = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / 127.0f;
    if (!(d > 0)) {
      std::fill(q, q + kXBlock, int8_t{0});
      total = 0;
      return d > 0 ? d : 0.0f;
    }
    const __m256 vd = _mm256_set1_ps(d);
    __m256i c[4];
    for (int i = 0; i < 4; ++i) c[i] = round_codes(x[i], vd);
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    total = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
    // packs interleave per 128-bit half: c0[0:4] c1[0:4] c2[0:4] c3[0:4] | c0[4:8] ...; the permutation undoes it
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return d;
  }
  __attribute__((target("avx2,fma"))) static void store(const int8_t* q, const float* d, bool nibbles,
                                                       const QInput& in, int64_t k) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
            b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
    if (nibbles) {  // per 16 bytes the 8 even ones then the 8 odd ones, then per 32 the 16 even then the 16 odd
      const __m256i pairs = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                             0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, pairs), 0xD8);
      b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, pairs), 0xD8);
      const __m256i even = _mm256_permute2x128_si256(a, b, 0x20), odd = _mm256_permute2x128_si256(a, b, 0x31);
      a = even;
      b = odd;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(in.q + k), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(in.q + k + 32), b);
    _mm256_storeu_ps(in.d + 8 * (k / kVec), _mm256_blend_ps(_mm256_set1_ps(d[0]), _mm256_set1_ps(d[1]), 0xF0));
  }
  __attribute__((target("avx2,fma"))) static Q8 codes(const int8_t* r, int64_t k) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k + 32))};
  }
  __attribute__((target("avx2,fma"))) static Q4 codes(const uint8_t* r, int64_t k) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k / 2)), low = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(c, low), _mm256_and_si256(_mm256_srli_epi16(c, 4), low)};
  }
  __attribute__((target("avx2,fma"))) static In input(const QInput& x, int64_t k) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + k)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + k + 32))};
  }
  // 32 products of |q| and xq with q's sign, in fours: [8] int32
  __attribute__((target("avx2,fma"))) static __m256i fours(__m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q)), _mm256_set1_epi16(1));
  }
  __attribute__((target("avx2,fma"))) static __m256i dot(Q8 v, const In& x) {
    const __m256i a = fours(v.a, x.a), b = fours(v.b, x.b);  // all of a's lanes the first block, b's the second
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
  }
  __attribute__((target("avx2,fma"))) static __m256i dot(Q4 v, const In& x) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(v.even, x.a), _mm256_maddubs_epi16(v.odd, x.b));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  }
  template <typename Q>
  __attribute__((target("avx2,fma"))) static F halves(Q, float s0, float s1) {
    return _mm256_blend_ps(_mm256_set1_ps(s0), _mm256_set1_ps(s1), 0xF0);
  }
  __attribute__((target("avx2,fma"))) static F zero() { return _mm256_setzero_ps(); }
  __attribute__((target("avx2,fma"))) static F set1(float v) { return _mm256_set1_ps(v); }
  __attribute__((target("avx2,fma"))) static F load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2,fma"))) static F to_float(__m256i v) { return _mm256_cvtepi32_ps(v); }
  __attribute__((target("avx2,fma"))) static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  __attribute__((target("avx2,fma"))) static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  __attribute__((target("avx2,fma"))) static void pairs(const bf16* z, F& scale, F& zero) {  // 8 pairs
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(z));
    scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  __attribute__((target("avx2,fma"))) static float sum(F v) { return hsum(v); }
};

// Quantize x [K] into `buffer` for int8 weights (nibbles false) or int4 ones, groups of g inputs.
template <typename S>
void quantize_input(const float* x, float* buffer, int64_t K, int64_t g, bool nibbles) {
  const QInput in = input_view(buffer, K);
  if (nibbles) std::fill(in.sum, in.sum + K / g, 0.0f);
  float d[kVec / kXBlock];
  alignas(64) int8_t q[kVec];
  for (int64_t k = 0; k < K; k += kVec) {
    for (int64_t h = 0; h < kVec / kXBlock; ++h) {  // the step's two blocks
      int32_t total;
      d[h] = S::quantize_block(x + k + h * kXBlock, q + h * kXBlock, total);
      // int4's zero term takes the sum of the inputs the codes see, d * xq (with x's own sum it would add the
      // inputs' rounding errors times the zero point, 8 steps)
      if (nibbles) in.sum[(k + h * kXBlock) / g] += d[h] * static_cast<float>(total);
    }
    S::store(q, d, nibbles, in, k);
  }
}

constexpr int kQBlock = 16;  // rows whose scales (and int4's zero terms) are read together, as float32

// int8 weights q [N, K] with scales s [N, G]
template <typename Sc>
struct Int8Weights {
  static constexpr int64_t kStep = kVec;  // a row's bytes per step
  const int8_t* q;
  const Sc* s;
  int64_t G, N, K;
  int64_t row_bytes() const { return K; }
  const int8_t* row(int64_t n) const { return q + n * K; }
  // rows [n, n + 16): scale[j * 16 + i] = s[n + i, j]; no zero term
  template <typename S>
  void block(int64_t n, const QInput&, float* scale, float* offset) const {
    for (int i = 0; i < kQBlock; ++i) {
      offset[i] = 0;
      for (int64_t j = 0; j < G; ++j) scale[j * kQBlock + i] = static_cast<float>(s[(n + i) * G + j]);
    }
  }
};

// int4 rows [n, n + 16) with bfloat16 scales and zeros zb [G, 16, 2]: Int4Weights::block's arithmetic, a vector of
// rows at once (one at a time, the conversions were a quarter of int4's instructions on AVX2)
template <typename S>
void int4_block(const bf16* zb, int64_t G, const QInput& x, float* scale, float* offset) {
  constexpr int V = kQBlock / S::kLanes;  // vectors per 16 rows
  typename S::F off[V];
  for (int v = 0; v < V; ++v) off[v] = S::zero();
  for (int64_t j = 0; j < G; ++j)
    for (int v = 0; v < V; ++v) {
      typename S::F sc, zero;
      S::pairs(zb + 2 * (j * kQBlock + v * S::kLanes), sc, zero);
      S::store(scale + j * kQBlock + v * S::kLanes, sc);
      off[v] = S::fmadd(S::fnmadd(S::set1(8.0f), sc, zero), S::set1(x.sum[j]), off[v]);
    }
  for (int v = 0; v < V; ++v) S::store(offset + v * S::kLanes, off[v]);
}

// int4 weights, "plain" layout: p [N, K / 2] (input 2i in byte i's low nibble, 2i + 1 in its high one), scales
// and zeros z [N / 16, G, 16, 2] (quant/formats.py `block_scales`: a block of 16 rows' are one run of memory, each
// group's 64 bytes in bfloat16)
template <typename Sc>
struct Int4Weights {
  static constexpr int64_t kStep = kVec / 2;
  const uint8_t* p;
  const Sc* z;
  int64_t G, N, K;
  int64_t row_bytes() const { return K / 2; }
  const uint8_t* row(int64_t n) const { return p + n * (K / 2); }
  // rows [n, n + 16): scale[j * 16 + i] and offset[i] = sum over groups j of (zero - 8 scale) * x.sum[j]
  // (8 * scale is exact: zero - 8 scale rounds once, in either form)
  template <typename S>
  void block(int64_t n, const QInput& x, float* scale, float* offset) const {
    const Sc* zb = z + 2 * kQBlock * G * (n / kQBlock);  // [G, 16, 2]
    if constexpr (std::is_same_v<Sc, bf16>) {
      int4_block<S>(zb, G, x, scale, offset);
    } else {
      for (int i = 0; i < kQBlock; ++i) offset[i] = 0;
      for (int64_t j = 0; j < G; ++j)
        for (int i = 0; i < kQBlock; ++i) {
          const Sc* pair = zb + 2 * (j * kQBlock + i);
          const float sc = static_cast<float>(pair[0]), zero = static_cast<float>(pair[1]);
          scale[j * kQBlock + i] = sc;
          offset[i] = std::fma(zero - 8.0f * sc, x.sum[j], offset[i]);
        }
    }
  }
};

// Rows [n0, n1) of w times R prepared inputs (R pairs of one expert: a prompt's pairs share each step's weights),
// buffer[r] -> y[r], n0 and n1 multiples of 16; S::kRows rows at a time: per group j, each row's steps summed, d per
// lane, then times the row's scale into its total; groups of 32 inputs share a step, their two scales across
// its lanes. Groups of one step or two (int4's default, 64) run as one flat loop over the steps, with the same
// arithmetic as the loop over groups (AVX-512, int4 warm in the L2: 19-24 against 12-14 G weights/s, one core).
// Each (input, row) has its own sums in the same order whatever R is, so R does not change a bit.
template <typename S, int R, typename W>
void rows_int(const W& w, const float* const* buffer, float* const* y, int64_t n0, int64_t n1) {
  using F = typename S::F;
  const int64_t K = w.K, G = w.G, g = K / G, bytes = w.row_bytes();
  const int64_t ahead = std::max<int64_t>(S::kRows, S::kAheadBytes / bytes / S::kRows * S::kRows);
  QInput x[R];
  for (int r = 0; r < R; ++r) x[r] = input_view(buffer[r], K);
  std::vector<float> scale(G * kQBlock);
  float offset[R][kQBlock];
  for (int64_t b = n0; b < n1; b += kQBlock) {
    for (int r = 0; r < R; ++r) w.template block<S>(b, x[r], scale.data(), offset[r]);
    for (int64_t n = b; n < b + kQBlock; n += S::kRows) {
      const bool fetch = n + ahead + S::kRows <= w.N;
      const char* next = reinterpret_cast<const char*>(w.row(n + ahead));  // the rows `ahead` of these, asked
      // for a line at a time along with the steps that read these rows' same bytes
      const float* sc = scale.data() + (n - b);  // row n + i's group j at sc[j * 16 + i]
      F tot[R][S::kRows];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < S::kRows; ++i) tot[r][i] = S::zero();
      // a group per step (64 inputs) or two (32, `halved`: their scales across the step's lanes): one flat loop,
      // compiled for each
      const auto flat = [&](auto halved) {
        constexpr int64_t groups = decltype(halved)::value ? 2 : 1;  // per step
        for (int64_t k = 0; k < K; k += kVec) {
          if (fetch) prefetch(next, bytes, S::kRows, k / kVec * W::kStep, (k / kVec + 1) * W::kStep);
          const float* s0 = sc + k / kVec * groups * kQBlock;  // the step's first group
          typename S::In in[R];
          for (int r = 0; r < R; ++r) in[r] = S::input(x[r], k);
          for (int i = 0; i < S::kRows; ++i) {
            const auto v = S::codes(w.row(n + i), k);
            F s;
            if constexpr (decltype(halved)::value) s = S::halves(v, s0[i], s0[kQBlock + i]);
            else s = S::set1(s0[i]);
            for (int r = 0; r < R; ++r) {
              const F t = S::mul(S::to_float(S::dot(v, in[r])), S::load(x[r].d + k / kVec * S::kLanes));
              tot[r][i] = S::fmadd(t, s, tot[r][i]);
            }
          }
        }
      };
      if (g == kXBlock) {
        flat(std::true_type{});
      } else if (g == kVec) {
        flat(std::false_type{});
      } else {
        for (int64_t j = 0; j < G; ++j) {
          F acc[R][S::kRows];
          for (int r = 0; r < R; ++r)
            for (int i = 0; i < S::kRows; ++i) acc[r][i] = S::zero();
          for (int64_t k = j * g; k < (j + 1) * g; k += kVec) {
            if (fetch) prefetch(next, bytes, S::kRows, k / kVec * W::kStep, (k / kVec + 1) * W::kStep);
            typename S::In in[R];
            F d[R];
            for (int r = 0; r < R; ++r) {
              in[r] = S::input(x[r], k);
              d[r] = S::load(x[r].d + k / kVec * S::kLanes);
            }
            for (int i = 0; i < S::kRows; ++i) {
              const auto v = S::codes(w.row(n + i), k);
              for (int r = 0; r < R; ++r) acc[r][i] = S::fmadd(S::to_float(S::dot(v, in[r])), d[r], acc[r][i]);
            }
          }
          for (int r = 0; r < R; ++r)
            for (int i = 0; i < S::kRows; ++i) tot[r][i] = S::fmadd(acc[r][i], S::set1(sc[j * kQBlock + i]), tot[r][i]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < S::kRows; ++i) y[r][n + i] = S::sum(tot[r][i]) + offset[r][n - b + i];
    }
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

template <int R, typename W>
__attribute__((target("avx512f,avx512bw,avx512vnni"), flatten)) void rows_vnni(const W& w, const float* const* x,
                                                                                float* const* y, int64_t n0, int64_t n1) {
  rows_int<Vnni512, R>(w, x, y, n0, n1);
}

template <int R, typename W>
__attribute__((target("avx2,fma"), flatten)) void rows_avx2_int8(const W& w, const float* const* x, float* const* y,
                                                                 int64_t n0, int64_t n1) {
  rows_int<Avx2Int8, R>(w, x, y, n0, n1);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"), flatten)) void quantize_vnni(const float* x, float* buffer,
                                                                                   int64_t K, int64_t g, bool nibbles) {
  quantize_input<Vnni512>(x, buffer, K, g, nibbles);
}

__attribute__((target("avx2,fma"), flatten)) void quantize_avx2_int8(const float* x, float* buffer, int64_t K,
                                                                     int64_t g, bool nibbles) {
  quantize_input<Avx2Int8>(x, buffer, K, g, nibbles);
}

// The integer path `isa` names (avx512_vnni or avx2_int8): an input row quantized, R rows times the weights.
void quantize(Isa isa, const float* x, float* buffer, int64_t K, int64_t g, bool nibbles) {
  if (isa == Isa::avx512_vnni) return quantize_vnni(x, buffer, K, g, nibbles);
  quantize_avx2_int8(x, buffer, K, g, nibbles);
}

template <int R, typename W>
void rows_integer(Isa isa, const W& w, const float* const* x, float* const* y, int64_t n0, int64_t n1) {
  if (isa == Isa::avx512_vnni) return rows_vnni<R>(w, x, y, n0, n1);
  rows_avx2_int8<R>(w, x, y, n0, n1);
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
  // two pairs of expert e: one after the other
  void two(int64_t e, const float* const* x, float* const* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    for (int r = 0; r < 2; ++r) (*this)(e, x[r], y[r], n0, n1, N, K);
  }
};

template <typename Sc>
struct Int8Rows {
  const int8_t* q;
  const Sc* s;
  int64_t G;
  Isa isa;
  int64_t N;  // output rows
  // the integer path where it applies: an integer isa, groups of 32 or multiples of 64 inputs, rows in sixteens
  bool integer(int64_t K) const {
    const int64_t g = K / G;
    return ::integer(isa) && K % kVec == 0 && (g == kXBlock || g % kVec == 0) && N % kQBlock == 0;
  }
  void prepare(const float* row, float* out, int64_t K) const {
    if (integer(K)) return quantize(isa, row, out, K, K / G, false);
    std::copy(row, row + K, out);
  }
  Int8Weights<Sc> weights(int64_t e, int64_t N, int64_t K) const { return {q + e * N * K, s + e * N * G, G, N, K}; }
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    const int8_t* qe = q + e * N * K;
    const Sc* se = s + e * N * G;
    const int64_t g = K / G;
    if (integer(K)) return rows_integer<1>(isa, weights(e, N, K), &x, &y, n0, n1);
    const Isa f = floats(isa);
    if (f >= Isa::avx512 && g % Avx512::kBlock == 0) return int8_avx512<Sc>(qe, se, G, x, y, n0, n1, K);
    if (f >= Isa::avx2 && g % Avx2::kBlock == 0) return int8_avx2<Sc>(qe, se, G, x, y, n0, n1, K);
    int8_portable<Sc>(qe, se, G, x, y, n0, n1, K);
  }
  // two pairs of expert e: the integer path reads each step's weights once for both
  void two(int64_t e, const float* const* x, float* const* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    if (integer(K)) return rows_integer<2>(isa, weights(e, N, K), x, y, n0, n1);
    for (int r = 0; r < 2; ++r) (*this)(e, x[r], y[r], n0, n1, N, K);
  }
};

// int4 experts ("plain" layout), integer paths only: p [E, N, K / 2], z [E, N / 16, G, 16, 2]
template <typename Sc>
struct Int4Rows {
  const uint8_t* p;
  const Sc* z;
  int64_t G;
  Isa isa;  // an integer one
  void prepare(const float* row, float* out, int64_t K) const { quantize(isa, row, out, K, K / G, true); }
  Int4Weights<Sc> weights(int64_t e, int64_t N, int64_t K) const { return {p + e * N * K / 2, z + e * G * N * 2, G, N, K}; }
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    rows_integer<1>(isa, weights(e, N, K), &x, &y, n0, n1);
  }
  void two(int64_t e, const float* const* x, float* const* y, int64_t n0, int64_t n1, int64_t N, int64_t K) const {
    rows_integer<2>(isa, weights(e, N, K), x, y, n0, n1);
  }
};

constexpr int64_t kDecodePairs = 16;  // steps of more pairs (prompts) run chunk by chunk

// Every pair's y[p] = rows of its expert @ x[p] over output rows [0, N), in tasks of kChunk rows across threads:
// pair by pair in a decode step (each pair's rows ahead are the ones asked for); in a longer step, whose pairs
// come sorted by expert, chunk by chunk and two pairs at a time, so that a chunk of an expert's rows is read
// from memory once and from the core's caches for the expert's other pairs, and two pairs of one expert share
// the reads (`two`).
template <typename Rows>
void gemv(const Rows& rows, const int64_t* expert, const float* x, float* y, int64_t P, int64_t N, int64_t K) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  if (P <= kDecodePairs) {
    at::parallel_for(0, P * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p = t / chunks, n0 = (t % chunks) * kChunk, n1 = std::min(N, n0 + kChunk);
        rows(expert[p], x + p * K, y + p * N, n0, n1, N, K);
      }
    });
    return;
  }
  const int64_t twos = (P + 1) / 2;  // pairs 2i and 2i + 1
  at::parallel_for(0, chunks * twos, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t % twos * 2, n0 = t / twos * kChunk, n1 = std::min(N, n0 + kChunk);
      if (p + 1 < P && expert[p] == expert[p + 1]) {
        const float* xs[2] = {x + p * K, x + (p + 1) * K};
        float* ys[2] = {y + p * N, y + (p + 1) * N};
        rows.two(expert[p], xs, ys, n0, n1, N, K);
      } else {
        for (int64_t q = p; q < std::min(P, p + 2); ++q) rows(expert[q], x + q * K, y + q * N, n0, n1, N, K);
      }
    }
  });
}

// Each of x's M rows [M, K] in float32, as `rows` reads it (split, bfloat16, or quantized for the integer path), into
// out [M, K]; across threads (a prompt's thousand rows, quantized for the integer path, would otherwise be a serial
// part of the step).
template <typename X, typename Rows>
void prepare_rows(const X* x, int64_t M, int64_t K, const Rows& rows, float* out) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(x[m * K + k]);
      rows.prepare(row.data(), out + m * K, K);
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
  prepare_rows(xw, P, D, in, xp);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max(D, I));
  const int64_t* ex = expert.data_ptr<int64_t>();
  gemv(in, ex, xp, hp, P, N, D);
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {  // each row's activation, prepared
    std::vector<float> row(I);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t i = 0; i < I; ++i) {
        const float gate = round_to<X>(hp[p * N + i]), up = round_to<X>(hp[p * N + I + i]);
        row[i] = round_to<X>(round_to<X>(gate / (1.0f + std::exp(-gate))) * up);
      }
      out.prepare(row.data(), ap + p * I, I);
    }
  });
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
  const Isa isa = isa_named(std::string(isa_name), false);
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
  const Isa isa = isa_named(std::string(isa_name), true);
  const int8_t *qi = q_in.data_ptr<int8_t>(), *qo = q_out.data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, Int8Rows<bf16>{qi, s_in.data_ptr<bf16>(), G_in, isa, N},
                     Int8Rows<bf16>{qo, s_out.data_ptr<bf16>(), G_out, isa, D}, N);
  return ffn<float>(x, expert, Int8Rows<float>{qi, s_in.data_ptr<float>(), G_in, isa, N},
                    Int8Rows<float>{qo, s_out.data_ptr<float>(), G_out, isa, D}, N);
}

// int4 experts in the "plain" layout: p [E, N, K / 2] uint8 and z [E, N / 16, K / g, 16, 2] scales and zeros in
// x's dtype, for each projection; inputs quantized to int8 (an integer path).
at::Tensor expert_ffn_int4(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& p_in,
                           const at::Tensor& z_in, const at::Tensor& p_out, const at::Tensor& z_out,
                           c10::string_view isa_name) {
  const Isa isa = isa_named(std::string(isa_name), true);
  TORCH_CHECK(integer(isa), "expert_ffn_int4 runs on an integer path (avx512_vnni, or avx2_int8 on any AVX2 CPU), got '",
              isa_name, "'; this CPU runs: ", c10::Join(", ", expert_isas()));
  const int64_t E = p_in.size(0), D = x.size(1), N = p_in.size(1), I = N / 2;
  check_rows(x, expert, E);
  TORCH_CHECK(N % 2 == 0 && D % kVec == 0 && I % kVec == 0,
              "expert_ffn_int4: gated experts whose inputs are multiples of 64");
  TORCH_CHECK(p_in.scalar_type() == at::kByte && p_out.scalar_type() == at::kByte, "expert_ffn_int4: uint8 codes");
  check_weights(p_in, E, N, D / 2, "p_in");
  check_weights(p_out, E, D, I / 2, "p_out");
  for (const auto& [z, rows] : {std::pair{&z_in, N}, std::pair{&z_out, D}})
    TORCH_CHECK(z->dim() == 5 && z->is_contiguous() && z->size(0) == E && z->size(1) * kQBlock == rows &&
                    z->size(3) == kQBlock && z->size(4) == 2,
                "expert_ffn_int4: scales and zeros [E, N / 16, G, 16, 2] (quant/formats.py block_scales), got ",
                z->sizes(), " for ", rows, " rows");
  const int64_t G_in = z_in.size(2), G_out = z_out.size(2);
  for (const auto& [K, G] : {std::pair{D, G_in}, std::pair{I, G_out}})
    TORCH_CHECK(G > 0 && K % G == 0 && (K / G == kXBlock || (K / G) % kVec == 0),
                "expert_ffn_int4: groups of 32 inputs or a multiple of 64, got ", K, " inputs in ", G, " groups");
  TORCH_CHECK(z_in.scalar_type() == x.scalar_type() && z_out.scalar_type() == x.scalar_type(),
              "expert_ffn_int4: scales in x's dtype");
  const uint8_t *pi = p_in.data_ptr<uint8_t>(), *po = p_out.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, Int4Rows<bf16>{pi, z_in.data_ptr<bf16>(), G_in, isa},
                     Int4Rows<bf16>{po, z_out.data_ptr<bf16>(), G_out, isa}, N);
  return ffn<float>(x, expert, Int4Rows<float>{pi, z_in.data_ptr<float>(), G_in, isa},
                    Int4Rows<float>{po, z_out.data_ptr<float>(), G_out, isa}, N);
}

// Decode-sized dense projections (attention, routers, shared experts, the LM head: kernels/dense.py):
// y [M, N] = x [M, K] @ w [N, K]^T, float32 sums rounded once to x's dtype (as F.linear), by the float paths above.
// Tasks of kChunk rows of w, at least 256 KiB of weights each (smaller matrices stay on the calling thread); a
// task reads its rows once for all of x's M rows (from the core's caches after the first).
template <typename X>
at::Tensor dense(const at::Tensor& x, const FloatRows<X>& rows, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xs = at::empty({M, K}, f32), y = at::empty({M, N}, f32);
  const X* xw = reinterpret_cast<const X*>(x.data_ptr());
  float *xp = xs.data_ptr<float>(), *yp = y.data_ptr<float>();
  prepare_rows(xw, M, K, rows, xp);
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (kChunk * std::max<int64_t>(K, 1) * int64_t{sizeof(X)}));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t m = 0; m < M; ++m)
        rows(0, xp + m * K, yp + m * N, t * kChunk, std::min(N, (t + 1) * kChunk), N, K);
  });
  return y.to(x.scalar_type());
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, c10::string_view isa_name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "linear_rows: x must be a contiguous CPU [M, K]");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "linear_rows: w must be a contiguous CPU [N, K] with x's K, got ", w.sizes(), " for x ", x.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_rows: x and w must share a dtype, float32 or bfloat16");
  const Isa isa = isa_named(std::string(isa_name), false);
  if (x.scalar_type() == at::kBFloat16) return dense<bf16>(x, FloatRows<bf16>{w.data_ptr<bf16>(), isa}, w.size(0));
  return dense<float>(x, FloatRows<float>{w.data_ptr<float>(), isa}, w.size(0));
}

}  // namespace

TORCH_LIBRARY(moedeploy, m) {
  m.def("expert_ffn(Tensor x, Tensor expert, Tensor w_in, Tensor w_out, str isa='best') -> Tensor");
  m.impl("expert_ffn", c10::DispatchKey::CPU, TORCH_FN(expert_ffn));
  m.def("expert_ffn_int8(Tensor x, Tensor expert, Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out, "
        "str isa='best') -> Tensor");
  m.impl("expert_ffn_int8", c10::DispatchKey::CPU, TORCH_FN(expert_ffn_int8));
  m.def("expert_ffn_int4(Tensor x, Tensor expert, Tensor p_in, Tensor z_in, Tensor p_out, Tensor z_out, "
        "str isa='best') -> Tensor");
  m.impl("expert_ffn_int4", c10::DispatchKey::CPU, TORCH_FN(expert_ffn_int4));
  m.def("linear_rows(Tensor x, Tensor w, str isa='best') -> Tensor");
  m.impl("linear_rows", c10::DispatchKey::CPU, TORCH_FN(linear_rows));
  m.def("expert_isas() -> str[]", &expert_isas);
}
