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
// up. On AVX2 the inner loop takes four weight rows at once, each with two independent accumulators (eight
// fused multiply-add chains in flight; a single chain waits on the FMA's latency), and reads bfloat16 weights
// 16 at a time: a shift gives the even inputs as float32, a mask the odd ones, against an input vector
// deinterleaved once per row (`split`), and asks for the next group's rows ahead (a bfloat16 row of 2048 inputs
// is one 4 KiB page, and the hardware's prefetcher stops at each page: +10-15% on an AVX2 EPYC; float32 rows
// gained nothing). Every output element is summed by one thread in a fixed order, so the
// bits do not depend on the thread count, on which rows share a step, or on where in a bank an expert sits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace {

using bf16 = c10::BFloat16;

constexpr int64_t kBlock = 16;  // inputs per step of the inner loop
constexpr int64_t kChunk = 64;  // output rows per task handed to a thread

template <typename W>
float round_to(float v) {
  if constexpr (std::is_same_v<W, bf16>) return static_cast<float>(bf16(v));  // round to nearest even
  return v;
}

// x [K] -> per block of 16 inputs, its 8 even then its 8 odd ones; the tail (K % 16) as it is.
void split(const float* x, float* out, int64_t K) {
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock)
    for (int j = 0; j < 8; ++j) {
      out[k + j] = x[k + 2 * j];
      out[k + 8 + j] = x[k + 2 * j + 1];
    }
  for (; k < K; ++k) out[k] = x[k];
}

// --- AVX2 + FMA ------------------------------------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sixteen weights of one row times the block's inputs, into the row's two accumulators.
__attribute__((target("avx2,fma"))) inline void fma16(const float* w, const float* x, __m256& a, __m256& b) {
  a = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), a);
  b = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), b);
}

__attribute__((target("avx2,fma"))) inline void fma16(const bf16* w, const float* x, __m256& a, __m256& b) {
  // x is split: x[0:8] the block's even inputs, x[8:16] its odd ones
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  a = _mm256_fmadd_ps(even, _mm256_loadu_ps(x), a);
  b = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 8), b);
}

// y[n] = w[n, :] . x for n in [n0, n1); w [*, K] row-major; x split when W is bfloat16.
template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const W* w, const float* x, float* y, int64_t n0, int64_t n1,
                                                    int64_t K) {
  const int64_t body = K - K % kBlock;
  int64_t n = n0;
  for (; n < n1; n += 4) {
    const int R = static_cast<int>(std::min<int64_t>(4, n1 - n));
    const W* r[4];
    for (int i = 0; i < 4; ++i) r[i] = w + (n + std::min(i, R - 1)) * K;  // a short group repeats its last row
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm256_setzero_ps();
    const char* next = reinterpret_cast<const char*>(w + (n + 4) * K);  // the next group's rows
    const bool ahead = std::is_same_v<W, bf16> && n + 8 <= n1;
    for (int64_t k = 0; k < body; k += kBlock) {
      if (ahead && k % 32 == 0)  // one cache line of each next row per 32 inputs
        for (int i = 0; i < 4; ++i) _mm_prefetch(next + (i * K + k) * sizeof(W), _MM_HINT_T0);
      for (int i = 0; i < 4; ++i) fma16(r[i] + k, x + k, a[i], b[i]);
    }
    for (int i = 0; i < R; ++i) {
      float s = hsum(_mm256_add_ps(a[i], b[i]));
      for (int64_t k = body; k < K; ++k) s += static_cast<float>(r[i][k]) * x[k];
      y[n + i] = s;
    }
  }
}

// --- portable --------------------------------------------------------------------------------------------------

template <typename W>
void rows_portable(const W* w, const float* x, float* y, int64_t n0, int64_t n1, int64_t K) {
  const int64_t body = K - K % kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const W* r = w + n * K;
    float acc[kBlock] = {};
    for (int64_t k = 0; k < body; k += kBlock)
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

template <typename S>
__attribute__((target("avx2,fma"))) void int8_avx2(const int8_t* q, const S* s, int64_t G, const float* x, float* y,
                                                    int64_t n0, int64_t n1, int64_t K) {
  const int64_t g = K / G;  // a multiple of kBlock here
  for (int64_t n = n0; n < n1; n += 4) {
    const int R = static_cast<int>(std::min<int64_t>(4, n1 - n));
    const int8_t* r[4];
    const S* sc[4];
    for (int i = 0; i < 4; ++i) {
      r[i] = q + (n + std::min(i, R - 1)) * K;
      sc[i] = s + (n + std::min(i, R - 1)) * G;
    }
    const int8_t* next = q + (n + 4) * K;
    const bool ahead = n + 8 <= n1;
    __m256 tot[4];
    for (int i = 0; i < 4; ++i) tot[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      __m256 a[4], b[4];
      for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm256_setzero_ps();
      for (int64_t k = j * g; k < (j + 1) * g; k += kBlock) {
        if (ahead && k % 64 == 0)
          for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
        const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
        for (int i = 0; i < 4; ++i) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + k));
          a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), xa, a[i]);
          b[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v))), xb, b[i]);
        }
      }
      for (int i = 0; i < 4; ++i)
        tot[i] = _mm256_fmadd_ps(_mm256_add_ps(a[i], b[i]), _mm256_set1_ps(static_cast<float>(sc[i][j])), tot[i]);
    }
    for (int i = 0; i < R; ++i) y[n + i] = hsum(tot[i]);
  }
}

template <typename S>
void int8_portable(const int8_t* q, const S* s, int64_t G, const float* x, float* y, int64_t n0, int64_t n1,
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

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// --- projections: rows [n0, n1) of expert e's matrix [N, K] times x (x split where kSplit) ---------------------

template <typename W>
struct FloatRows {
  static constexpr bool kSplit = std::is_same_v<W, bf16>;
  const W* w;
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K,
                  bool portable) const {
    const W* we = w + e * N * K;
    if (has_avx2() && !portable)
      rows_avx2<W>(we, x, y, n0, n1, K);
    else
      rows_portable<W>(we, x, y, n0, n1, K);
  }
};

template <typename S>
struct Int8Rows {
  static constexpr bool kSplit = false;
  const int8_t* q;
  const S* s;
  int64_t G;
  void operator()(int64_t e, const float* x, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K,
                  bool portable) const {
    const int8_t* qe = q + e * N * K;
    const S* se = s + e * N * G;
    if (has_avx2() && !portable && (K / G) % kBlock == 0)
      int8_avx2<S>(qe, se, G, x, y, n0, n1, K);
    else
      int8_portable<S>(qe, se, G, x, y, n0, n1, K);
  }
};

// Every pair's y[p] = rows of its expert @ x[p] over output rows [0, N), in tasks of kChunk rows across threads.
template <typename Rows>
void gemv(const Rows& rows, const int64_t* expert, const float* x, float* y, int64_t P, int64_t N, int64_t K,
          bool portable) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, P * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / chunks, n0 = (t % chunks) * kChunk, n1 = std::min(N, n0 + kChunk);
      rows(expert[p], x + p * K, y + p * N, n0, n1, N, K, portable);
    }
  });
}

// One input row, in float32, as `Rows` reads it (split or as it is).
template <typename Rows>
void inputs(const float* row, float* out, int64_t K) {
  if constexpr (Rows::kSplit)
    split(row, out, K);
  else
    std::copy(row, row + K, out);
}

// The FFN of every pair, X the dtype of x, of the outputs and of the roundings (as eager torch in that dtype).
template <typename X, typename Rows>
at::Tensor ffn(const at::Tensor& x, const at::Tensor& expert, const Rows& in, const Rows& out, int64_t N,
               bool portable) {
  const int64_t P = x.size(0), D = x.size(1), I = N / 2;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xs = at::empty({P, D}, f32), h = at::empty({P, N}, f32), a = at::empty({P, I}, f32),
             y = at::empty({P, D}, f32);
  const X* xw = reinterpret_cast<const X*>(x.data_ptr());
  float *xp = xs.data_ptr<float>(), *hp = h.data_ptr<float>(), *ap = a.data_ptr<float>(), *yp = y.data_ptr<float>();
  std::vector<float> row(std::max(D, I));
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(xw[p * D + d]);
    inputs<Rows>(row.data(), xp + p * D, D);
  }
  const int64_t* ex = expert.data_ptr<int64_t>();
  gemv(in, ex, xp, hp, P, N, D, portable);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < I; ++i) {
      const float gate = round_to<X>(hp[p * N + i]), up = round_to<X>(hp[p * N + I + i]);
      row[i] = round_to<X>(round_to<X>(gate / (1.0f + std::exp(-gate))) * up);
    }
    inputs<Rows>(row.data(), ap + p * I, I);
  }
  gemv(out, ex, ap, yp, P, D, I, portable);
  return y.to(x.scalar_type());
}

void check_rows(const at::Tensor& x, const at::Tensor& expert) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "expert_ffn: x must be a contiguous CPU [P, D]");
  TORCH_CHECK(expert.dim() == 1 && expert.is_contiguous() && expert.scalar_type() == at::kLong &&
                  expert.size(0) == x.size(0),
              "expert_ffn: one int64 expert per row");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "expert_ffn takes float32 or bfloat16");
}

void check_weights(const at::Tensor& w, int64_t E, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3, "expert_ffn: ", what,
              " must be a contiguous CPU [E, N, K]");
  TORCH_CHECK(w.size(0) == E && w.size(1) == N && w.size(2) == K, "expert_ffn: ", what, " has shape ", w.sizes(),
              ", expected [", E, ", ", N, ", ", K, "]");
}

// portable: the plain C++ loops even where AVX2 is there (what a CPU without it runs; for tests)
at::Tensor expert_ffn(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& w_in,
                      const at::Tensor& w_out, bool portable) {
  check_rows(x, expert);
  const int64_t E = w_in.size(0), D = x.size(1), N = w_in.size(1);
  TORCH_CHECK(N % 2 == 0, "expert_ffn: gated experts have an even first projection");
  check_weights(w_in, E, N, D, "w_in");
  check_weights(w_out, E, D, N / 2, "w_out");
  TORCH_CHECK(x.scalar_type() == w_in.scalar_type() && w_in.scalar_type() == w_out.scalar_type(),
              "expert_ffn: x and the weights must share a dtype");
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, FloatRows<bf16>{w_in.data_ptr<bf16>()}, FloatRows<bf16>{w_out.data_ptr<bf16>()}, N,
                     portable);
  return ffn<float>(x, expert, FloatRows<float>{w_in.data_ptr<float>()}, FloatRows<float>{w_out.data_ptr<float>()}, N,
                    portable);
}

// int8 experts: q [E, N, K] int8 and s [E, N, G] scales in x's dtype, for each projection.
at::Tensor expert_ffn_int8(const at::Tensor& x, const at::Tensor& expert, const at::Tensor& q_in,
                           const at::Tensor& s_in, const at::Tensor& q_out, const at::Tensor& s_out, bool portable) {
  check_rows(x, expert);
  const int64_t E = q_in.size(0), D = x.size(1), N = q_in.size(1), I = N / 2;
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
  const int8_t *qi = q_in.data_ptr<int8_t>(), *qo = q_out.data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16)
    return ffn<bf16>(x, expert, Int8Rows<bf16>{qi, s_in.data_ptr<bf16>(), G_in},
                     Int8Rows<bf16>{qo, s_out.data_ptr<bf16>(), G_out}, N, portable);
  return ffn<float>(x, expert, Int8Rows<float>{qi, s_in.data_ptr<float>(), G_in},
                    Int8Rows<float>{qo, s_out.data_ptr<float>(), G_out}, N, portable);
}

}  // namespace

TORCH_LIBRARY(moedeploy, m) {
  m.def("expert_ffn(Tensor x, Tensor expert, Tensor w_in, Tensor w_out, bool portable=False) -> Tensor");
  m.impl("expert_ffn", c10::DispatchKey::CPU, TORCH_FN(expert_ffn));
  m.def("expert_ffn_int8(Tensor x, Tensor expert, Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out, "
        "bool portable=False) -> Tensor");
  m.impl("expert_ffn_int8", c10::DispatchKey::CPU, TORCH_FN(expert_ffn_int8));
}
