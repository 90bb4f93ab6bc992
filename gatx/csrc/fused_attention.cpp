// Fused sparse attention over a CSR graph (CPU, OpenMP): scores, edge softmax and aggregation in one
// pass per destination row; backward recomputes scores from the per-row log-sum-exp.
//
// Plain C++ with an extern "C" interface (no torch headers: ~15 s to compile, once); gatx builds it on
// first use and loads it with ctypes (gatx/backends/fused.py). gatx.Graph validated the indices and
// the Python side checks every shape before calling in; still, every pass checks each row's offsets
// before reading its edges and each edge's ids before using them (bad_row / bad_edge), and the call
// returns 2 instead of reading out of bounds, so no index can crash the process.
//
// Node rows may be column slices of a wider buffer (row strides k_stride, v_stride, q_stride; and the
// gradients' out_stride, dk_stride, dq_stride): GATConv's projection writes [v | k | q] side by side
// in one (N, H*D + 2H) buffer, and its backward reads [dv | dk | dq] laid out the same way.
//
// Notation: row i (a dst node), edge e (original edge id), j = src of e, h head, D value width.
//   additive: z = k[j,h] + q[i,h] (+ bias[e,h]),   s = z > 0 ? z : slope * z
//   dot:      s = scale * <q[i,h,:], k[j,h,:]> (+ bias[e,h])
//   GATv2:    z = q[i,h,:] + k[j,h,:] (+ ee[e,h,:]),  s = sum_d av[h,d] * lrelu(z[h,d])  (k is v; gat2_backward)
//   p = exp(s - lse[i,h]) (the softmax), c = keep[e,h] * keep_scale * w[e(,h)], a = p * c
//   out[i,h,:] = sum_e a * v[j,h,:] (+ ob[h,:], a layer's output bias, when given)
// Shared values (v_shared): v has one head, v[j,:], read by every head (v[j,h,:] = v[j,:] above), and
// dv[j,:] is the sum over the heads; GATConv aggregates its input rows so, then projects the (few) dst rows.
// Backward, with g = dL/dout and ga = dL/da (when the attention is returned):
//   da = <g[i,h,:], v[j,h,:]> + ga[e,h],  delta[i,h] = sum_e p * c * da,  ds = p * (c * da - delta)
//   dz = ds * (z > 0 ? 1 : slope) (additive) ; dv[j] += a * g[i] ; dw[e] += p * keep * keep_scale * da
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

// exp(x) for float: range reduction + degree-6 polynomial, branch free so loops vectorise
// (about 2 ulp). x < -87.3 (including -inf) gives exactly 0, like the softmax of a masked score.
inline float fast_exp(float x) {
  const float hi = 88.37626f, lo = -87.33654f;
  const bool under = x < lo;
  x = std::min(std::max(x, lo), hi);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// log(x) for a positive normal float (a row's softmax normaliser, >= 1): x = m * 2^e with m in
// [sqrt(1/2), sqrt(2)), log(m) by Cephes' logf polynomial (about 1 ulp). Branch free, so the loop over a
// row's heads vectorises: one logf call per row and head took about a quarter of the forward's samples
// on Cora-sized graphs.
inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = (low ? m + m : m) - 1.0f;  // log(x) = e * log(2) + log(1 + m), |m| < 0.42
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + e * 0.693359375f;
}
inline double fast_log(double x) { return std::log(x); }

// Gathers are the bottleneck (random rows of k / v / g): prefetch whole rows ahead, in two steps.
// Measured (100k nodes, 2.1M random edges, H = D = 8, one thread): without prefetching, the two
// backward passes take 2.3x longer; into L1 6 to 12 edges ahead are equally good. The backward
// passes also ask for the rows kFar edges ahead into L2 (an L2 request does not wait for one of L1's
// few fill buffers, so many more rows are in flight): the single pass 374 -> 123-145 ms (2 threads; 24
// to 40 edges equally good; only when the helper below is inlined: called, it bought nothing). The
// forward's first loop does the same (2026-11-24, Zen 4, alternating processes, GATConv 8x8 fwd+bwd,
// 2 threads): 0.93x at 10k nodes, 0.86x at 100k, 0.82x at 300k, 0.85-0.89x at 100k beside two busy
// processes; 16 edges ahead took 1.26x the time of 32, 64 was level with 32. The src-row passes also
// ask for their per-edge rows (bias, the edge gradients they write) kFar edges ahead: those are read and
// written by edge id, at random there, from (E, H) arrays larger than the L3 (100k nodes, 2 threads: the
// single pass with a per-edge bias and its gradient 102 -> 73 ms; GATv2Conv's attention backward 89-93 ->
// 64-71 ms in the profiler; no change without per-edge rows).
constexpr int64_t kAhead = 6, kFar = 32;
// Row `row` (elements `stride` apart) of `base`, `n` elements. The row ids ahead of the current edge are
// not checked yet (bad_edge checks an id when its edge comes), so the address is computed in unsigned
// integers (no pointer overflow); a prefetch never faults, whatever the address.
template <int LEVEL = 3, int RW = 0, typename T>  // LEVEL 3: into L1, 2: into L2; RW 1: to be written
inline void prefetch_row(const T* base, int64_t row, int64_t stride, int64_t n) {
  const uintptr_t c = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(row) * stride * sizeof(T);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(c + off), RW, LEVEL);
}

// The bounds checks, fused into the passes (a separate pass over the 16 bytes of ids per edge cost 2-3 ms
// a call at 2.1M edges): a row's offsets must satisfy 0 <= p0 <= p1 <= n_edges (with indptr[0] = 0 and
// indptr[n_rows] = n_edges checked at entry, that is indptr non-decreasing), an edge's other endpoint
// must lie in [0, n_other) and its id in [0, n_edges). A pass that finds a bad one skips the rest of its
// rows and returns 2 (its outputs are then garbage, and the caller raises).
inline bool bad_row(int64_t p0, int64_t p1, int64_t n_edges) { return p0 < 0 || p1 < p0 || p1 > n_edges; }
// a pass's test at the top of each row: true (and bad set) when this thread has met a bad index before or
// the row's edges [p0, p0 + deg) are out of range; the pass then skips the row
inline bool skip_row(int& bad, int64_t p0, int64_t deg, int64_t n_edges) {
  if (bad || bad_row(p0, p0 + deg, n_edges)) bad = 1;
  return bad;
}
inline bool bad_edge(int64_t other, int64_t e, int64_t n_other, int64_t n_edges) {
  return (static_cast<uint64_t>(other) >= static_cast<uint64_t>(n_other)) |
         (static_cast<uint64_t>(e) >= static_cast<uint64_t>(n_edges));
}

template <typename T>
struct Args {
  int64_t n_rows, n_other, H, Dk, Dv;  // n_other: the number of nodes on the other side (nbr's range)
  // rows of the pass: CSR by dst (forward, backward pass A) or by src (backward pass B, the single pass)
  const int64_t* indptr;
  const int64_t* nbr;   // the other endpoint of each edge, in row order
  const int64_t* eid;   // edge id of each edge in row order
  const T* q;           // additive: (N_dst, H); dot: (N_dst, H, Dk); row i at q + i * q_stride
  const T* k;           // additive: (N_src, H); dot: (N_src, H, Dk); row j at k + j * k_stride
  const T* v;           // (N_src, H, Dv), or (N_src, Dv) when v_shared; row j at v + j * v_stride
  const T* bias;        // (E, H) or null
  const T* ew;          // (E,) or (E, H) or null
  int ew_heads;         // 1 when ew is (E, H)
  const uint8_t* keep;  // (E, H) dropout keep-mask or null
  T keep_scale;         // 1 / (1 - p)
  T scale, slope;
  const T* g;           // (N_dst, H, Dv) grad of out (backward)
  const T* ga;          // (E, H) grad of the returned attention or null (backward)
  T* stat;              // (N_dst, 2, H): lse (written by forward), delta (written by pass A)
  // outputs
  T* out;   // forward: (N_dst, H, Dv); pass A: dq or null; pass B: dv or null (rows out_stride apart)
  T* attn;  // forward: (E, H) or null; pass A: dbias or null
  T* dk;    // pass B: dk or null (rows dk_stride apart)
  T* dw;    // pass A and the single pass: dw or null
  const T* o;  // the single pass: the forward's output (N_dst, H, Dv)
  T* dq;       // the single pass: dq or null (additive (N_dst, H), dot (N_dst, H, Dk)), rows dq_stride apart
  const T* ob;  // (H, Dv) output bias or null: the forward adds it to every out row; the single pass takes o as
                // including it (delta uses o - ob)
  T* dob;       // the single pass: (H, Dv) gradient of ob (the sum of g's rows) or null
  int nthreads;
  int v_shared;      // v has one head that every head reads (the SV instantiations)
  int64_t q_stride;  // H (additive) or H * Dk (dot) unless q is a column slice; the single pass packs q with dq
  int64_t k_stride, v_stride, out_stride, dk_stride, dq_stride;  // row strides (elements)
  // GATv2's score (kV2): q = fd, k = v = fs (rows of H x Dk, Dk == Dv), av = attn (H, Dk), ee the optional
  // per-edge term (E, H, Dk); its backward (gat2_backward) writes attn's and ee's gradients into dav and
  // dee (each or null)
  const T* av;
  const T* ee;
  T* dav;
  T* dee;
};

template <typename T, int DC>
inline void axpy(T a, const T* __restrict x, T* __restrict y, int64_t D) {
  const int64_t n = DC ? DC : D;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// y[h, :] += a[h] * x[h, :] for all heads
template <typename T, int HC, int DC>
inline void head_axpy(const T* __restrict a, const T* __restrict x, T* __restrict y, int64_t H, int64_t D) {
  const int64_t nh = HC ? HC : H, nd = DC ? DC : D;
  for (int64_t h = 0; h < nh; ++h) {
    const T ah = a[h];
#pragma omp simd
    for (int64_t d = 0; d < nd; ++d) y[h * nd + d] += ah * x[h * nd + d];
  }
}

// y[:] += sum_h a[h] * g[h, :] (the gradient of a shared value row), or head_axpy
template <typename T, int HC, int DC, bool SV>
inline void value_grad_axpy(const T* __restrict a, const T* __restrict g, T* __restrict y, int64_t H, int64_t D) {
  if (!SV) return head_axpy<T, HC, DC>(a, g, y, H, D);
  const int64_t nh = HC ? HC : H, nd = DC ? DC : D;
  for (int64_t h = 0; h < nh; ++h) {
    const T ah = a[h];
#pragma omp simd
    for (int64_t d = 0; d < nd; ++d) y[d] += ah * g[h * nd + d];
  }
}

#ifdef __AVX__
// <x[h, :], y[h, :]> of 8 heads x 8 floats: the 8 products' lane sums in one transposing tree of hadds
// (the generic loop reduces each head on its own: 8 horizontal reductions per edge)
inline void head_dots_8x8(const float* __restrict x, const float* __restrict y, float* __restrict out) {
  __m256 p[8];
  for (int h = 0; h < 8; ++h) p[h] = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * h), _mm256_loadu_ps(y + 8 * h));
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));  // heads 0-3, per half
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));  // heads 4-7
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)));
}
#endif

// out[h] = <x[h, :], y[h, :]> for all heads
template <typename T, int HC, int DC>
inline void head_dots(const T* __restrict x, const T* __restrict y, T* __restrict out, int64_t H, int64_t D) {
#ifdef __AVX__
  if (std::is_same<T, float>::value && HC == 8 && DC == 8) {
    return head_dots_8x8(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y),
                         reinterpret_cast<float*>(out));
  }
#endif
  const int64_t nh = HC ? HC : H, nd = DC ? DC : D;
  for (int64_t h = 0; h < nh; ++h) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < nd; ++d) acc += x[h * nd + d] * y[h * nd + d];
    out[h] = acc;
  }
}


// Shared values, one dst row: out[h, :] = sum_t a[t, h] * v[nbr[t], :] over the row's deg edges. The row's
// value rows are read once per 64-byte column block, with every head's accumulator for the block held in
// registers (an edge-major loop, as head_axpy's, loads and stores all H x Dv accumulators per edge).
template <typename T, int HC>
inline void shared_rows_sum(const T* __restrict a, const int64_t* __restrict nbr, int64_t deg, const T* __restrict v,
                            int64_t v_stride, T* __restrict out, int64_t H, int64_t Dv) {
  constexpr int64_t W = 64 / sizeof(T);
  const int64_t nh = HC ? HC : H;
  int64_t d0 = 0;
  if (HC) {
    for (; d0 + W <= Dv; d0 += W) {
      T acc[HC ? HC : 1][W] = {};
      for (int64_t t = 0; t < deg; ++t) {
        const T* __restrict x = v + nbr[t] * v_stride + d0;
        const T* __restrict at = a + t * nh;
        for (int64_t h = 0; h < nh; ++h) {
#pragma omp simd
          for (int64_t d = 0; d < W; ++d) acc[h][d] += at[h] * x[d];
        }
      }
      for (int64_t h = 0; h < nh; ++h) std::copy(acc[h], acc[h] + W, out + h * Dv + d0);
    }
  }
  if (d0 == Dv) return;
  for (int64_t h = 0; h < nh; ++h) std::fill(out + h * Dv + d0, out + h * Dv + Dv, T(0));
  for (int64_t t = 0; t < deg; ++t) {
    const T* __restrict x = v + nbr[t] * v_stride;
    for (int64_t h = 0; h < nh; ++h) {
      const T ah = a[t * nh + h];
#pragma omp simd
      for (int64_t d = d0; d < Dv; ++d) out[h * Dv + d] += ah * x[d];
    }
  }
}

// Shared values: out[h] = <g[h, :], v[:]> for all heads; with a compile-time head count the heads' sums
// side by side (one dependent chain of adds per head otherwise)
template <typename T, int HC>
inline void shared_dots(const T* __restrict g, const T* __restrict v, T* __restrict out, int64_t H, int64_t Dv) {
  constexpr int64_t W = 64 / sizeof(T);
  if (!HC) {
    for (int64_t h = 0; h < H; ++h) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < Dv; ++d) acc += g[h * Dv + d] * v[d];
      out[h] = acc;
    }
    return;
  }
  T acc[HC ? HC : 1][W] = {};
  int64_t d0 = 0;
  for (; d0 + W <= Dv; d0 += W) {
    for (int64_t h = 0; h < HC; ++h) {
#pragma omp simd
      for (int64_t d = 0; d < W; ++d) acc[h][d] += g[h * Dv + d0 + d] * v[d0 + d];
    }
  }
  for (int64_t h = 0; h < HC; ++h) {
    T sum = 0;
    for (int64_t d = 0; d < W; ++d) sum += acc[h][d];
    for (int64_t d = d0; d < Dv; ++d) sum += g[h * Dv + d] * v[d];
    out[h] = sum;
  }
}

// GATv2's pre-activation of one edge, z = (a + b) (+ e) (H x D values), added as the written-out form adds them
template <typename T>
inline void gat2_preact(const T* __restrict a, const T* __restrict b, const T* __restrict e, T* __restrict z,
                        int64_t HD) {
#pragma omp simd
  for (int64_t x = 0; x < HD; ++x) z[x] = a[x] + b[x];
  if (e) {
#pragma omp simd
    for (int64_t x = 0; x < HD; ++x) z[x] += e[x];
  }
}

// GATv2's score of one edge from its pre-activation: lr = lrelu(z) (lr may be z itself), then s[h] =
// sum_d attn[h,d] * lr[h,d] (float 8 x 8: head_dots's shuffle tree)
template <typename T, int HC, int DC>
inline void gat2_score_of(const T* z, const T* __restrict attn, T slope, T* lr, T* __restrict s, int64_t H_,
                          int64_t D_) {
  const int64_t H = HC ? HC : H_, D = DC ? DC : D_;
#pragma omp simd
  for (int64_t x = 0; x < H * D; ++x) lr[x] = z[x] * (z[x] > 0 ? T(1) : slope);
  head_dots<T, HC, DC>(attn, lr, s, H, D);
}

// One edge's backward terms: t = g[e,h] * attn[h,d] * lrelu'(z) summed into the row's gradient, written
// to the edge's gradient when DE, and g * lrelu(z) into attn's partial sums when given. DE is a template
// flag: as a run-time test inside the vectorised loop, the store made GATv2Conv without edge features about
// 1.1x slower at 10k nodes and more at 100k (alternating processes, 2 threads).
template <typename T, bool DE, int HC, int DC>
inline void gat2_edge_grad(const T* __restrict z, const T* __restrict ge, const T* __restrict attn, T slope,
                           int64_t H_, int64_t D_, T* __restrict acc_row, T* __restrict de, T* __restrict acc) {
  const int64_t H = HC ? HC : H_, D = DC ? DC : D_;
  for (int64_t h = 0; h < H; ++h) {
    const T gh = ge[h];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T x = z[h * D + d];
      const T m = x > 0 ? T(1) : slope;
      const T t = gh * attn[h * D + d] * m;
      acc_row[h * D + d] += t;
      if (DE) de[h * D + d] = t;
      if (acc) acc[h * D + d] += gh * (x * m);
    }
  }
}

// The score kinds (template parameter SC): additive (GAT's scalar terms), dot product, and GATv2's
// vector score, kV2: z = q[i,h,:] + k[j,h,:] (+ ee[e,h,:]), s = sum_d av[h,d] * lrelu(z[h,d]) (+ bias).
constexpr int kAdd = 0, kDot = 1, kV2 = 2;

// The score s of edge (i <- j, id e) for all heads; fac[h] = ds/dz (additive) or 1. kV2 leaves z (which
// its backward reads) and lrelu(z), H x Dk each, in zb. Branch free (the sign of z is random: a branch per
// head would mispredict half the time).
template <typename T, int SC, int HC, int DC>
inline void scores(const Args<T>& A, int64_t i, int64_t j, int64_t e, T* __restrict s, T* __restrict fac,
                   T* __restrict zb = nullptr) {
  const int64_t H = HC ? HC : A.H;
  const T* __restrict b = A.bias ? A.bias + e * H : nullptr;
  if constexpr (SC == kV2) {
    const int64_t HD = H * (DC ? DC : A.Dk);
    gat2_preact(A.k + j * A.k_stride, A.q + i * A.q_stride, A.ee ? A.ee + e * HD : nullptr, zb, HD);
    gat2_score_of<T, HC, DC>(zb, A.av, A.slope, zb + HD, s, H, A.Dk);
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) {
      s[h] += b ? b[h] : T(0);
      fac[h] = 1;
    }
  } else if (SC == kDot) {
    const int64_t Dk = DC ? DC : A.Dk;  // specialised dot kernels have Dk == Dv (see run)
    const T scale = A.scale;
    head_dots<T, HC, DC>(A.q + i * A.q_stride, A.k + j * A.k_stride, s, H, Dk);
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) {
      s[h] = s[h] * scale + (b ? b[h] : T(0));
      fac[h] = 1;
    }
  } else {
    const T slope = A.slope;
    const T* __restrict qi = A.q + i * A.q_stride;
    const T* __restrict kj = A.k + j * A.k_stride;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) {
      const T z = (kj[h] + qi[h]) + (b ? b[h] : T(0));
      const T f = z > 0 ? T(1) : slope;
      fac[h] = f;
      s[h] = z * f;
    }
  }
}

// c[h] = keep * keep_scale * w for edge e; kd[h] = keep * keep_scale (the factor of dw)
template <typename T, int HC>
inline void edge_factor(const Args<T>& A, int64_t e, T* __restrict c, T* __restrict kd) {
  const int64_t H = HC ? HC : A.H;
  for (int64_t h = 0; h < H; ++h) kd[h] = A.keep ? (A.keep[e * H + h] ? A.keep_scale : T(0)) : T(1);
  if (!A.ew) {
    for (int64_t h = 0; h < H; ++h) c[h] = kd[h];
  } else if (A.ew_heads) {
    for (int64_t h = 0; h < H; ++h) c[h] = kd[h] * A.ew[e * H + h];
  } else {
    const T w = A.ew[e];
    for (int64_t h = 0; h < H; ++h) c[h] = kd[h] * w;
  }
}

inline int64_t chunk_for(int64_t n, int nthreads) {
  return std::max<int64_t>(16, std::min<int64_t>(1024, n / (int64_t(nthreads) * 32 + 1)));
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// An output row: the accumulator, plus the layer's output bias ob when given (added here instead of by
// another pass over the output).
template <typename T>
inline void store_out(T* __restrict out, const T* __restrict acc, const T* __restrict ob, int64_t n) {
  if (!ob) {
    std::copy(acc, acc + n, out);
    return;
  }
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) out[x] = acc[x] + ob[x];
}

// ---------------------------------------------------------------- forward (rows = dst nodes)
// Returns 2 when an index is out of range (see bad_row), else 0.
template <typename T, int SC, int HC, int DC, bool SV>
int forward(const Args<T>& args) {
  const int64_t H = HC ? HC : args.H, Dv = DC ? DC : args.Dv, vw = SV ? Dv : H * Dv;  // vw: a v row's width
  const int64_t kw = SC == kAdd ? H : H * (DC ? DC : args.Dk), n_edges = args.indptr[args.n_rows];
  const int64_t chunk = chunk_for(args.n_rows, args.nthreads);
  int bad = 0;
#pragma omp parallel num_threads(args.nthreads) reduction(| : bad)
  {
    const Args<T>& A = args;
    const int64_t* __restrict indptr = A.indptr;
    const int64_t* __restrict nbr = A.nbr;
    const int64_t* __restrict eid = A.eid;
    const T* __restrict v = A.v;
    T* const attn = A.attn;
    const bool need_c = A.keep || A.ew;
    // the specialised kernels keep the per-row vectors and the accumulator on the stack, where the
    // compiler can hold them in registers instead of storing and reloading them per edge through heap
    // memory that other pointers might alias (100k nodes, 2 threads: forward 84-87 -> 76-80 ms, A/B)
    std::vector<T> buf, vec(HC ? 0 : 6 * H), acc(DC && HC ? 0 : H * Dv);
    alignas(64) T stk[HC ? 6 * HC : 1];
    alignas(64) T acc_stk[HC && DC ? HC * DC : 1];
    std::vector<T> zv(SC == kV2 && !(HC && DC) ? 2 * kw : 0);  // kV2: z and lrelu(z) of one edge
    alignas(64) T z_stk[SC == kV2 && HC && DC ? 2 * HC * DC : 1];
    T* __restrict zb = SC == kV2 && HC && DC ? z_stk : zv.data();
    T* __restrict m = HC ? stk : vec.data();
    T* __restrict accp = HC && DC ? acc_stk : acc.data();
    T* __restrict l = m + H;
    T* __restrict fac = l + H;
    T* __restrict c = fac + H;
    T* __restrict kd = c + H;
    T* __restrict a = kd + H;
    std::fill(c, c + H, T(1));
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t i = 0; i < A.n_rows; ++i) {
      const int64_t p0 = indptr[i], deg = indptr[i + 1] - p0;
      if (skip_row(bad, p0, deg, n_edges)) continue;
      T* out_i = A.out + i * H * Dv;
      T* lse_i = A.stat + i * 2 * H;
      if (deg == 0) {
        std::fill(accp, accp + H * Dv, T(0));
        store_out(out_i, accp, A.ob, H * Dv);
        std::fill(lse_i, lse_i + H, T(0));
        continue;
      }
      if (static_cast<int64_t>(buf.size()) < deg * H) buf.resize(deg * H);
      T* __restrict sb = buf.data();
      std::fill(m, m + H, T(kNegInf));
      for (int64_t t = 0; t < deg; ++t) {
        if (p0 + t + kFar < n_edges) {  // k and v rows into L2 first, as the backward passes do
          const int64_t jf = nbr[p0 + t + kFar];
          prefetch_row<2>(A.k, jf, A.k_stride, kw);
          if (SC != kV2) prefetch_row<2>(v, jf, A.v_stride, vw);  // kV2: v is k
        }
        if (p0 + t + kAhead < n_edges) {
          const int64_t ja = nbr[p0 + t + kAhead];
          prefetch_row(A.k, ja, A.k_stride, kw);
          if (A.bias) prefetch_row(A.bias, eid[p0 + t + kAhead], H, H);
          if (A.ee) prefetch_row(A.ee, eid[p0 + t + kAhead], kw, kw);
          if (SC != kV2) prefetch_row(v, ja, A.v_stride, vw);  // for the third loop
        }
        const int64_t j = nbr[p0 + t], e = eid[p0 + t];
        if (bad_edge(j, e, A.n_other, n_edges)) {
          bad = 1;
          break;
        }
        T* s = sb + t * H;
        scores<T, SC, HC, DC>(A, i, j, e, s, fac, zb);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) m[h] = std::max(m[h], s[h]);
      }
      if (bad) continue;
      // a row whose scores are all -inf gets max 0 (its weights are then all 0), as the reference does
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        m[h] = m[h] > T(kNegInf) ? m[h] : T(0);
        l[h] = 0;
      }
      for (int64_t t = 0; t < deg; ++t) {
        T* s = sb + t * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          s[h] = fast_exp(s[h] - m[h]);
          l[h] += s[h];
        }
      }
      // two loops: GCC 12 does not vectorise the select and fast_log's in one ("control flow in loop")
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) l[h] = l[h] > 0 ? l[h] : T(1);  // >= 1 (the max's term); 0: all -inf
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        lse_i[h] = m[h] + fast_log(l[h]);
        l[h] = T(1) / l[h];
      }
      if (SV) {  // shared values: the weights first (in place of the scores), then one blocked sum
        for (int64_t t = 0; t < deg; ++t) {
          const int64_t e = eid[p0 + t];
          if (need_c) edge_factor<T, HC>(A, e, c, kd);
          T* __restrict at = sb + t * H;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) at[h] = at[h] * l[h] * c[h];
          if (attn) std::copy(at, at + H, attn + e * H);
        }
        shared_rows_sum<T, HC>(sb, nbr + p0, deg, v, A.v_stride, accp, H, Dv);
        store_out(out_i, accp, A.ob, H * Dv);
        continue;
      }
      std::fill(accp, accp + H * Dv, T(0));
      for (int64_t t = 0; t < deg; ++t) {
        const int64_t j = nbr[p0 + t], e = eid[p0 + t];
        if (need_c) edge_factor<T, HC>(A, e, c, kd);
        const T* s = sb + t * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) a[h] = s[h] * l[h] * c[h];
        if (attn) std::copy(a, a + H, attn + e * H);
        head_axpy<T, HC, DC>(a, v + j * A.v_stride, accp, H, Dv);
      }
      store_out(out_i, accp, A.ob, H * Dv);
    }
  }
  return bad ? 2 : 0;
}

// ---------------------------------------------------------------- backward pass A (rows = dst nodes)
// delta (into stat), dq (out; additive (N_dst, H), dot (N_dst, H, Dk)), dbias (attn), dw; 2 on a bad index
template <typename T, int SC, int HC, int DC, bool SV>
int backward_dst(const Args<T>& args) {
  static_assert(SC != kV2, "GATv2's score runs the single backward pass only");
  constexpr bool DOT = SC == kDot;
  const int64_t H = HC ? HC : args.H, Dv = DC ? DC : args.Dv, Dk = DC ? DC : args.Dk, vw = SV ? Dv : H * Dv;
  const int64_t qw = DOT ? H * Dk : H, n_edges = args.indptr[args.n_rows];
  const int64_t chunk = chunk_for(args.n_rows, args.nthreads);
  int bad = 0;
#pragma omp parallel num_threads(args.nthreads) reduction(| : bad)
  {
    const Args<T>& A = args;
    T* dq = A.out;
    T* dbias = A.attn;
    T* dw = A.dw;
    std::vector<T> bp, bd, bf, vec(6 * H), dqv(qw);
    T* __restrict s = vec.data();
    T* __restrict fac = s + H;
    T* __restrict c = fac + H;
    T* __restrict kd = c + H;
    T* __restrict da = kd + H;
    T* __restrict delta = da + H;
    T* __restrict dqi = dqv.data();
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t i = 0; i < A.n_rows; ++i) {
      const int64_t p0 = A.indptr[i], deg = A.indptr[i + 1] - p0;
      if (skip_row(bad, p0, deg, n_edges)) continue;
      const T* gi = A.g + i * H * Dv;
      const T* lse_i = A.stat + i * 2 * H;
      std::fill(delta, delta + H, T(0));
      if (static_cast<int64_t>(bp.size()) < deg * H) {
        bp.resize(deg * H);
        bd.resize(deg * H);
        bf.resize(deg * H);
      }
      for (int64_t t = 0; t < deg; ++t) {
        const int64_t j = A.nbr[p0 + t], e = A.eid[p0 + t];
        if (p0 + t + kFar < n_edges) {
          const int64_t jf = A.nbr[p0 + t + kFar];
          prefetch_row<2>(A.k, jf, A.k_stride, qw);
          prefetch_row<2>(A.v, jf, A.v_stride, vw);
        }
        if (p0 + t + kAhead < n_edges) {
          const int64_t ja = A.nbr[p0 + t + kAhead], ea = A.eid[p0 + t + kAhead];
          prefetch_row(A.k, ja, A.k_stride, qw);
          prefetch_row(A.v, ja, A.v_stride, vw);
          if (A.bias) prefetch_row(A.bias, ea, H, H);
          if (A.ga) prefetch_row(A.ga, ea, H, H);
        }
        if (bad_edge(j, e, A.n_other, n_edges)) {
          bad = 1;
          break;
        }
        scores<T, SC, HC, DC>(A, i, j, e, s, fac);
        edge_factor<T, HC>(A, e, c, kd);
        if (SV) {
          shared_dots<T, HC>(gi, A.v + j * A.v_stride, da, H, Dv);
        } else {
          head_dots<T, HC, DC>(gi, A.v + j * A.v_stride, da, H, Dv);
        }
        T* __restrict p = bp.data() + t * H;
        T* __restrict dat = bd.data() + t * H;
        T* __restrict ft = bf.data() + t * H;
        const T* ga = A.ga ? A.ga + e * H : nullptr;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          p[h] = fast_exp(s[h] - lse_i[h]);
          dat[h] = da[h] + (ga ? ga[h] : T(0));
          delta[h] += p[h] * c[h] * dat[h];
          ft[h] = fac[h];
        }
        if (dw) {
          if (A.ew_heads) {
            for (int64_t h = 0; h < H; ++h) dw[e * H + h] = p[h] * dat[h] * kd[h];
          } else {
            T acc = 0;
            for (int64_t h = 0; h < H; ++h) acc += p[h] * dat[h] * kd[h];
            dw[e] = acc;
          }
        }
      }
      if (bad) continue;
      std::copy(delta, delta + H, A.stat + i * 2 * H + H);
      if (!dq && !dbias) continue;
      std::fill(dqi, dqi + qw, T(0));
      for (int64_t t = 0; t < deg; ++t) {
        const int64_t j = A.nbr[p0 + t], e = A.eid[p0 + t];
        edge_factor<T, HC>(A, e, c, kd);
        const T* __restrict p = bp.data() + t * H;
        const T* __restrict dat = bd.data() + t * H;
        const T* __restrict ft = bf.data() + t * H;
        T* __restrict dz = s;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dz[h] = p[h] * (c[h] * dat[h] - delta[h]) * ft[h];
        if (dbias) std::copy(dz, dz + H, dbias + e * H);
        if (DOT) {
          for (int64_t h = 0; h < H; ++h) axpy<T, DC>(dz[h] * A.scale, A.k + j * A.k_stride + h * Dk, dqi + h * Dk, Dk);
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) dqi[h] += dz[h];
        }
      }
      if (dq) std::copy(dqi, dqi + qw, dq + i * A.out_stride);
    }
  }
  return bad ? 2 : 0;
}

// The rows a src-row backward pass (B or single) reads for the edge at position pa (into dst node ia,
// id ea): the dst rows kFar edges ahead into L2, everything kAhead edges ahead into L1. dqt: the single
// pass's dq partial sums (rows dq_stride apart), or null.
template <typename T>
__attribute__((always_inline)) inline void prefetch_src_pass(const Args<T>& A, int64_t pa, int64_t n_edges,
                                                             const T* dqt, int64_t dq_stride, int64_t kw, int64_t H,
                                                             int64_t Dv) {
  if (pa + kFar < n_edges) {
    const int64_t ib = A.nbr[pa + kFar];
    prefetch_row<2>(A.q, ib, A.q_stride, kw);
    prefetch_row<2>(A.g, ib, H * Dv, H * Dv);
    prefetch_row<2>(A.stat, ib, 2 * H, 2 * H);
    if (dqt) prefetch_row<2>(dqt, ib, dq_stride, kw);
    if (A.bias || A.ga || A.keep || A.ew || A.attn || A.dw) {  // per-edge rows, by edge id: random here
      const int64_t eb = A.eid[pa + kFar];
      if (A.bias) prefetch_row<2>(A.bias, eb, H, H);
      if (A.ga) prefetch_row<2>(A.ga, eb, H, H);
      if (A.keep) prefetch_row<2>(A.keep, eb, H, H);
      if (A.ew) prefetch_row<2>(A.ew, eb, A.ew_heads ? H : 1, 1);
      if (A.attn) prefetch_row<2, 1>(A.attn, eb, H, H);
      if (A.dw) prefetch_row<2, 1>(A.dw, eb, A.ew_heads ? H : 1, 1);
    }
  }
  if (pa + kAhead < n_edges) {
    const int64_t ia = A.nbr[pa + kAhead], ea = A.eid[pa + kAhead];
    prefetch_row(A.q, ia, A.q_stride, kw);
    prefetch_row(A.g, ia, H * Dv, H * Dv);
    prefetch_row(A.stat, ia, 2 * H, 2 * H);
    if (dqt) prefetch_row(dqt, ia, dq_stride, kw);
    if (A.bias) prefetch_row(A.bias, ea, H, H);
    if (A.ga) prefetch_row(A.ga, ea, H, H);
    if (A.keep) prefetch_row(A.keep, ea, H, H);
    if (A.ew) prefetch_row(A.ew, ea, A.ew_heads ? H : 1, 1);
  }
}

// The threads of a pass that keeps a sum of `bytes` per thread: the sums stay under 1 GiB in all (fewer
// threads for a huge graph); all of them without sums
inline int threads_for_sums(bool sums, int nthreads, int64_t bytes) {
  if (!sums) return nthreads;
  return static_cast<int>(std::min<int64_t>(nthreads, 1 + (int64_t(1) << 30) / std::max<int64_t>(1, bytes)));
}

// n elements at a 64-byte boundary when `want`, else none (ptr null); not zeroed
template <typename T>
struct AlignedBuffer {
  std::unique_ptr<T[]> mem;
  T* ptr;
  AlignedBuffer(bool want, int64_t n)
      : mem(want ? new T[n + 64 / sizeof(T)] : nullptr),
        ptr(reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(mem.get()) + 63) & ~uintptr_t(63))) {}
};

// dst[:width] += the `parts` rows at first, first + step, first + 2 step, ...: other threads' sums of a row
template <typename T>
inline void add_sums(T* __restrict dst, const T* __restrict first, int parts, int64_t step, int64_t width) {
  for (int t = 0; t < parts; ++t) {
    const T* __restrict part = first + t * step;
#pragma omp simd
    for (int64_t col = 0; col < width; ++col) dst[col] += part[col];
  }
}

// ---------------------------------------------------------------- backward over the src rows: pass B and the single pass
// Every gradient in one pass over the src rows, without the dst pass (and its gather of v per edge):
// delta[i] = sum_e p c da = <g[i], o[i]> (o = the forward's output; no attention gradient ga), then per
// edge dz = p (c da - delta) ds/dz, with dq[i] += dz scattered into per-thread buffers (summed into dq at
// the end) and dbias[e], dw[e] written by edge id. Outputs: out = dv, dk, dq, attn = dbias, dw (each or null).
// dq's partial sums are grouped by thread (rows handed out dynamically), so its last bits can differ
// from run to run on several threads; passes 1 + 2 give the same bits on any thread count.
// Pass B (o null): delta is already in stat (pass A wrote it, with the attention gradient ga, which da
// then includes); only dv and dk, each row summed in edge order. 2 on a bad index.
template <typename T, int SC, int HC, int DC, bool SV>
int backward_single(const Args<T>& args) {
  static_assert(SC != kV2, "GATv2's score has its own backward (gat2_backward)");
  constexpr bool DOT = SC == kDot;
  const int64_t H = HC ? HC : args.H, Dv = DC ? DC : args.Dv, Dk = DC ? DC : args.Dk, vw = SV ? Dv : H * Dv;
  const int64_t kw = SC == kAdd ? H : H * Dk, n_edges = args.indptr[args.n_rows], n_dst = args.n_other;
  // dq partial sums: every thread adds into its own zeroed slice of (n_dst) rows, summed into dq at the end.
  // Packed (additive scores, a row of q and dq within one cache line): a slice's rows are [q_i | dq_i]
  // (64-byte aligned), so an edge's read of q_i and its add into dq_i touch one line, not two (100k
  // nodes, 2.1M edges, 8 heads, 2 threads: a GAT layer's fwd+bwd 5-7% faster in alternating runs).
  const bool pack = args.dq && SC == kAdd && 2 * kw * int64_t(sizeof(T)) <= 64;
  const int64_t qd = pack ? 2 * kw : kw, dq_at = pack ? kw : 0;  // a slice's row stride; dq's offset in a row
  const int nt = threads_for_sums(args.dq, args.nthreads, n_dst * qd * int64_t(sizeof(T)));
  // not zeroed here (a serial memset of 12.8 MB at 100k nodes, 2 threads): the prologue writes every row
  const AlignedBuffer<T> extra(args.dq, nt * n_dst * qd);
  T* const base = extra.ptr;
  const int64_t chunk = chunk_for(args.n_rows, nt), chunk_dst = chunk_for(n_dst, nt);
  if (args.dob) std::fill(args.dob, args.dob + H * Dv, T(0));
  int bad = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad)  // one region: delta and the packed q rows, the edges, the dq reduction
  {
    const Args<T>& A = args;
    T* dv = A.out;
    T* dbias = A.attn;
    T* dw = A.dw;
    T* stat = A.stat;
    // the output bias's gradient: this thread's sum of the g rows it reads here anyway; the ob term of delta
    std::vector<T> gsum(A.dob ? H * Dv : 0), obd(A.ob ? H : 0);
    // dynamic here too, and in the dq reduction: a static half waits for its thread when it is descheduled
#pragma omp for schedule(dynamic, chunk_dst)
    for (int64_t i = 0; i < (A.o ? n_dst : 0); ++i) {  // pass B: delta is in stat, no dq
      const T* __restrict g_i = A.g + i * H * Dv;
      T* __restrict delta_i = stat + i * 2 * H + H;
      head_dots<T, HC, DC>(g_i, A.o + i * H * Dv, delta_i, H, Dv);
      if (A.ob) {  // o includes the output bias: delta = <g, o - ob>
        head_dots<T, HC, DC>(g_i, A.ob, obd.data(), H, Dv);
        for (int64_t h = 0; h < H; ++h) delta_i[h] -= obd[h];
      }
      if (A.dob) {
        T* __restrict acc = gsum.data();
#pragma omp simd
        for (int64_t x = 0; x < H * Dv; ++x) acc[x] += g_i[x];
      }
      if (!A.dq) continue;
      for (int64_t t = 0; t < nt; ++t) {
        T* row = base + (t * n_dst + i) * qd;
        if (pack) std::copy(A.q + i * A.q_stride, A.q + i * A.q_stride + kw, row);
        std::fill(row + dq_at, row + dq_at + kw, T(0));
      }
    }
    if (A.dob) {
#pragma omp critical(gatx_dob)
      for (int64_t x = 0; x < H * Dv; ++x) A.dob[x] += gsum[x];
    }
    const int tid = omp_get_thread_num();
    Args<T> B = A;  // A, with q read from this thread's packed rows when packed
    if (pack) {
      B.q = base + tid * n_dst * qd;
      B.q_stride = qd;
    }
    T* __restrict dqt = A.dq ? base + tid * n_dst * qd + dq_at : nullptr;
    std::vector<T> vec(8 * H), accv(H * Dv), acck(kw);
    T* __restrict s = vec.data();
    T* __restrict fac = s + H;
    T* __restrict c = fac + H;
    T* __restrict kd = c + H;
    T* __restrict p = kd + H;
    T* __restrict da = p + H;
    T* __restrict dz = da + H;
    const T* __restrict no_ga = dz + H;  // H zeros: da + ga without a branch when there is no ga
    // dynamic: under contention (other processes on the cores) static chunks wait for a descheduled thread
    // (measured 100k nodes, load 9: a GAT layer's fwd+bwd 4.46 s static, 2.98 s dynamic)
#pragma omp for schedule(dynamic, chunk)
    for (int64_t j = 0; j < A.n_rows; ++j) {
      const int64_t p0 = A.indptr[j], deg = A.indptr[j + 1] - p0;
      if (skip_row(bad, p0, deg, n_edges)) continue;
      const T* vj = A.v + j * A.v_stride;
      const T* kj = A.k + j * A.k_stride;
      std::fill(accv.begin(), accv.end(), T(0));
      std::fill(acck.begin(), acck.end(), T(0));
      for (int64_t t = 0; t < deg; ++t) {
        const int64_t i = A.nbr[p0 + t], e = A.eid[p0 + t];
        prefetch_src_pass<T>(B, p0 + t, n_edges, pack ? nullptr : dqt, qd, kw, H, Dv);  // packed: q's line
        if (bad_edge(i, e, n_dst, n_edges)) {
          bad = 1;
          break;
        }
        scores<T, SC, HC, DC>(B, i, j, e, s, fac);
        edge_factor<T, HC>(A, e, c, kd);
        const T* gi = A.g + i * H * Dv;
        const T* lse_i = A.stat + i * 2 * H;
        const T* delta_i = lse_i + H;
        if (SV) {
          shared_dots<T, HC>(gi, vj, da, H, Dv);
        } else {
          head_dots<T, HC, DC>(gi, vj, da, H, Dv);
        }
        const T* __restrict ga = A.ga ? A.ga + e * H : no_ga;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          p[h] = fast_exp(s[h] - lse_i[h]);
          da[h] += ga[h];
          dz[h] = p[h] * (c[h] * da[h] - delta_i[h]) * fac[h];
        }
        if (DOT) {
          for (int64_t h = 0; h < H; ++h) {
            if (A.dk) axpy<T, DC>(dz[h] * A.scale, A.q + i * A.q_stride + h * Dk, acck.data() + h * Dk, Dk);
            if (dqt) axpy<T, DC>(dz[h] * A.scale, kj + h * Dk, dqt + i * qd + h * Dk, Dk);
          }
        } else {
          T* __restrict dqi = dqt ? dqt + i * qd : nullptr;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) acck[h] += dz[h];
          if (dqi) {
#pragma omp simd
            for (int64_t h = 0; h < H; ++h) dqi[h] += dz[h];
          }
        }
        if (dbias) std::copy(dz, dz + H, dbias + e * H);
        if (dw) {
          if (A.ew_heads) {
            for (int64_t h = 0; h < H; ++h) dw[e * H + h] = p[h] * da[h] * kd[h];
          } else {
            T acc = 0;
            for (int64_t h = 0; h < H; ++h) acc += p[h] * da[h] * kd[h];
            dw[e] = acc;
          }
        }
        if (dv) {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) p[h] *= c[h];
          value_grad_axpy<T, HC, DC, SV>(p, gi, accv.data(), H, Dv);
        }
      }
      if (bad) continue;
      if (dv) std::copy(accv.begin(), accv.begin() + vw, dv + j * A.out_stride);
      if (A.dk) std::copy(acck.begin(), acck.end(), A.dk + j * A.dk_stride);
    }
    if (A.dq) {
#pragma omp for schedule(dynamic, chunk_dst) nowait
      for (int64_t row = 0; row < n_dst; ++row) {
        const T* first = base + row * qd + dq_at;
        T* __restrict dst = A.dq + row * A.dq_stride;
        std::copy(first, first + kw, dst);
        add_sums(dst, first + n_dst * qd, nt - 1, n_dst * qd, kw);
      }
    }
  }
  return bad ? 2 : 0;
}

// ---------------------------------------------------------------- GATv2's backward (rows = dst nodes)
// Every gradient of GATv2's attention (kV2) in one pass over the dst rows. Per row i: delta = <g[i], o[i]>;
// per edge (j, e), recomputed: z, s and p = exp(s - lse[i]); da = <g[i], fs[j]>, dz = p (c da - delta) and
// t = dz[h] * av[h,:] * lrelu'(z) (z's gradient). Then fd[i] += t (in registers), dee[e] = t, dav += dz[h] *
// lrelu(z) (per thread), and fs[j] += p c g[i] + t, scattered into a zeroed sum per thread (the first
// thread's is out itself; the others' are buffers added into it at the end).
// An edge reads one random row (fs[j]) and adds into one (its thread's fs[j] sum); a pass over the src rows
// would read three (fd[i], g[i] and the row statistics) and add into fd[i]'s sum (100k nodes, 2.1M edges,
// 8 x 8, 2 threads: 138 ms over the src rows, 103 ms here with a buffer per thread, 95 ms with the first
// thread's sum in out). The sums' last bits depend on which thread ran which rows.
// Outputs: out = dfs, dq = dfd, dav, dee (each or null). 2 on a bad index.
template <typename T, int HC, int DC>
int gat2_backward(const Args<T>& args) {
  const int64_t H = HC ? HC : args.H, D = DC ? DC : args.Dk, kw = H * D;
  const int64_t n_edges = args.indptr[args.n_rows], n_src = args.n_other;
  const int nt = threads_for_sums(args.out, args.nthreads, n_src * kw * int64_t(sizeof(T)));
  const AlignedBuffer<T> extra(args.out && nt > 1, (nt - 1) * n_src * kw);  // zeroed in the region
  T* const base = extra.ptr;
  const int64_t chunk = chunk_for(args.n_rows, nt), chunk_src = chunk_for(n_src, nt);
  if (args.dav) std::fill(args.dav, args.dav + kw, T(0));
  int bad = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad)  // one region: the zeroed sums, the edges, their reduction
  {
    const Args<T>& A = args;
    if (A.out) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < nt * n_src; ++r) {
        T* row = r < n_src ? A.out + r * A.out_stride : base + (r - n_src) * kw;
        std::fill(row, row + kw, T(0));
      }
    }
    const int tid = omp_get_thread_num();
    T* __restrict dfst = !A.out ? nullptr : tid == 0 ? A.out : base + (tid - 1) * n_src * kw;
    const int64_t fst = tid == 0 ? A.out_stride : kw;  // dfst's row stride
    // per edge: H values each of s, fac, c, kd, p, da, dz; per row delta (H) and fd[i]'s gradient (kw); z,
    // lrelu(z) (written by scores) and t (kw each)
    std::vector<T> heads(8 * H), rows(4 * kw), davs(A.dav ? kw : 0);
    T *s = heads.data(), *fac = s + H, *c = fac + H, *kd = c + H, *p = kd + H, *da = p + H, *dz = da + H, *delta = dz + H;
    T *zb = rows.data(), *tb = zb + 2 * kw, *accq = tb + kw;
    const T slope = A.slope;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < A.n_rows; ++i) {
      const int64_t p0 = A.indptr[i], deg = A.indptr[i + 1] - p0;
      if (skip_row(bad, p0, deg, n_edges)) continue;
      const T* __restrict gi = A.g + i * kw;
      const T* __restrict lse_i = A.stat + i * 2 * H;
      head_dots<T, HC, DC>(gi, A.o + i * kw, delta, H, D);
      std::fill(accq, accq + kw, T(0));
      for (int64_t t = 0; t < deg; ++t) {
        if (p0 + t + kFar < n_edges) {  // the src rows (and their sums) into L2 first, then L1
          const int64_t jf = A.nbr[p0 + t + kFar];
          prefetch_row<2>(A.k, jf, A.k_stride, kw);
          if (dfst) prefetch_row<2, 1>(dfst, jf, fst, kw);
        }
        if (p0 + t + kAhead < n_edges) {
          const int64_t ja = A.nbr[p0 + t + kAhead], ea = A.eid[p0 + t + kAhead];
          prefetch_row(A.k, ja, A.k_stride, kw);
          if (dfst) prefetch_row<3, 1>(dfst, ja, fst, kw);
          if (A.ee) prefetch_row(A.ee, ea, kw, kw);
          if (A.keep) prefetch_row(A.keep, ea, H, H);
        }
        const int64_t j = A.nbr[p0 + t], e = A.eid[p0 + t];
        if (bad_edge(j, e, A.n_other, n_edges)) {
          bad = 1;
          break;
        }
        scores<T, kV2, HC, DC>(A, i, j, e, s, fac, zb);
        edge_factor<T, HC>(A, e, c, kd);
        const T* __restrict kj = A.k + j * A.k_stride;
        head_dots<T, HC, DC>(gi, kj, da, H, D);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          p[h] = fast_exp(s[h] - lse_i[h]);
          dz[h] = p[h] * (c[h] * da[h] - delta[h]);
          p[h] *= c[h];  // the attention weight a
        }
        // t into fd's gradient and tb (for ee's and fs's), dz * lrelu(z) into attn's
        gat2_edge_grad<T, true, HC, DC>(zb, dz, A.av, slope, H, D, accq, tb, A.dav ? davs.data() : nullptr);
        if (A.dee) std::copy(tb, tb + kw, A.dee + e * kw);
        if (dfst) {  // fs[j] += a g[i] + t
          T* __restrict fj = dfst + j * fst;
          for (int64_t h = 0; h < H; ++h) {
            const T ah = p[h];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) fj[h * D + d] += ah * gi[h * D + d] + tb[h * D + d];
          }
        }
      }
      if (bad) continue;
      if (A.dq) std::copy(accq, accq + kw, A.dq + i * A.dq_stride);
    }
    if (A.dav) {
#pragma omp critical(gatx_dav)
      for (int64_t x = 0; x < kw; ++x) A.dav[x] += davs[x];
    }
    if (A.out && nt > 1) {
#pragma omp for schedule(dynamic, chunk_src) nowait
      for (int64_t row = 0; row < n_src; ++row) add_sums(A.out + row * A.out_stride, base + row * kw, nt - 1, n_src * kw, kw);
    }
  }
  return bad ? 2 : 0;
}

template <typename T, int SC, int HC, int DC, bool SV = false>
int run3(int which, const Args<T>& A) {
  if (which == 0) return forward<T, SC, HC, DC, SV>(A);
  if constexpr (SC == kV2) {  // the forward and its own backward only (entry checks)
    return gat2_backward<T, HC, DC>(A);
  } else {
    if (which == 1) return backward_dst<T, SC, HC, DC, SV>(A);
    return backward_single<T, SC, HC, DC, SV>(A);  // 2 (pass B) and 3
  }
}

// Compile-time head count / width for the common float32 shapes (GAT 8 x 8; per-head widths of
// vision and transformer models); everything else, and float64, runs the generic instantiation.
// A specialised dot (or kV2) kernel takes its key width from DC too, so it needs Dk == Dv.
template <typename T, int SC>
int run(int which, const Args<T>& A) {
  if constexpr (SC != kV2) {
    if (A.v_shared) {  // shared values: any widths; 8 heads (GAT's usual count) with its accumulators in registers
      return A.H == 8 ? run3<T, SC, 8, 0, true>(which, A) : run3<T, SC, 0, 0, true>(which, A);
    }
  }
  if (std::is_same<T, float>::value && (SC == kAdd || A.Dk == A.Dv)) {
    if (A.H == 8 && A.Dv == 8) return run3<T, SC, 8, 8>(which, A);
    switch (A.Dv) {
      case 8: return run3<T, SC, 0, 8>(which, A);
      case 16: return run3<T, SC, 0, 16>(which, A);
      case 32: return run3<T, SC, 0, 32>(which, A);
      case 64: return run3<T, SC, 0, 64>(which, A);
      default: break;
    }
  }
  return run3<T, SC, 0, 0>(which, A);
}

// strides: the row strides (elements) of q, k, v, out, dk and dq; null for contiguous rows. Each must
// be at least its row's width (overlapping output rows would race). mode: the score kind (kAdd, kDot,
// kV2); kV2 takes av (and ee, dav, dee: see Args) and k and v the same rows, and runs the forward (which 0)
// and its own backward (which 1: gat2_backward, rows = dst nodes; out = dfs, dq = dfd).
template <typename T>
int entry(int which, int mode, int64_t n_rows, int64_t n_other, int64_t n_edges, int64_t H, int64_t Dk, int64_t Dv, const int64_t* indptr,
          const int64_t* nbr, const int64_t* eid, const T* q, const T* k, const T* v, const T* bias,
          const T* ew, int ew_heads, const uint8_t* keep, double keep_scale, double scale, double slope,
          const T* g, const T* ga, T* stat, T* out, T* attn, T* dk, T* dw, const T* o, T* dq,
          const T* ob, T* dob, const int64_t* strides, int nthreads, int v_shared, const T* av, const T* ee,
          T* dav, T* dee) {
  if (which < 0 || which > 3 || mode < kAdd || mode > kV2 || H < 0 || Dk < 0 || Dv < 0) return 1;
  if (mode == kV2 ? (which > 1 || v_shared || Dk != Dv || k != v || dk || (!av && H * Dk > 0) || (dee && !ee) ||
                     ((dav || dee) && which != 1) || (which == 1 && (ga || ((!g || !o || !stat) && n_rows * H * Dv > 0))))
                  : (av || ee || dav || dee))
    return 1;
  // the output bias: added by the forward, read (with its gradient) by the single pass only
  if ((ob && which != 0 && which != 3) || (dob && (which != 3 || !ob))) return 1;
  // the single pass needs g, o and stat (unless they are empty), and no ga
  if (which == 3 && (ga || ((!g || !o || !stat) && n_other * H * Dv > 0))) return 1;
  // pass B reads delta from stat (pass A wrote it) and writes dv and dk only
  if (which == 2 && (o || dq || attn || dw)) return 1;
  const int64_t kw = mode != kAdd ? H * Dk : H;  // the width of a row of q or k
  // q k v out dk dq; out: (N, H, Dv) in the forward, v's width in pass B / single (dv), q's in pass A (dq)
  const int64_t vw = v_shared ? Dv : H * Dv;  // the width of a row of v (and of dv)
  const int64_t width[6] = {kw, kw, vw, which == 0 ? H * Dv : which == 1 ? kw : vw, kw, kw};
  int64_t stride[6];
  for (int x = 0; x < 6; ++x) {
    stride[x] = strides ? strides[x] : width[x];
    if (stride[x] < width[x]) return 1;
  }
  // the O(1) part of the bounds check; the passes check every row and edge (bad_row, bad_edge)
  if (n_rows < 0 || n_other < 0 || n_edges < 0 || !indptr || indptr[0] != 0 || indptr[n_rows] != n_edges) return 2;
  if (n_edges > 0 && (!nbr || !eid)) return 2;
  // small inputs run on one thread: waking a team costs more than it saves (and much more when the
  // cores are oversubscribed)
  const int64_t work = (n_rows + n_edges) * H * (Dv + Dk);
  // (measured on Cora, 13k edges, 8 x 8: 0.8 ms on one thread, 0.95 ms on two, and 60 ms on two when
  // other processes keep both cores busy)
  const int threads = work < (int64_t(1) << 21) ? 1 : std::max(1, nthreads);
  Args<T> A{n_rows, n_other, H, Dk, Dv, indptr, nbr, eid, q, k, v, bias, ew, ew_heads, keep,
            static_cast<T>(keep_scale), static_cast<T>(scale), static_cast<T>(slope), g, ga, stat,
            out, attn, dk, dw, o, dq, ob, dob, threads, v_shared != 0, stride[0], stride[1], stride[2], stride[3], stride[4], stride[5],
            av, ee, dav, dee};
  try {  // an exception must not cross the C interface (std::terminate): 3 = out of memory
    if (mode == kV2) return run<T, kV2>(which, A);
    return mode == kDot ? run<T, kDot>(which, A) : run<T, kAdd>(which, A);
  } catch (const std::bad_alloc&) {
    return 3;
  }
}

}  // namespace

// which: 0 forward, 1 backward pass over dst rows, 2 backward pass over src rows, 3 the single
// backward pass over src rows (see Args and backward_single); mode: 0 additive, 1 dot, 2 GATv2's score
// (see entry: which 1 is then gat2_backward). Returns 0, 1 for bad arguments, 2 for indices out of range, 3 when a buffer cannot be
// allocated.
#define GATX_ENTRY(NAME, T)                                                                              \
  extern "C" int NAME(int which, int mode, int64_t n_rows, int64_t n_other, int64_t n_edges, int64_t H,  \
                      int64_t Dk, int64_t Dv,                                                           \
                      const int64_t* indptr, const int64_t* nbr, const int64_t* eid, const T* q,        \
                      const T* k, const T* v, const T* bias, const T* ew, int ew_heads,                 \
                      const uint8_t* keep, double keep_scale, double scale, double slope, const T* g,   \
                      const T* ga, T* stat, T* out, T* attn, T* dk, T* dw, const T* o, T* dq,           \
                      const T* ob, T* dob, const int64_t* strides, int nthreads, int v_shared,          \
                      const T* av, const T* ee, T* dav, T* dee) {                                       \
    return entry<T>(which, mode, n_rows, n_other, n_edges, H, Dk, Dv, indptr, nbr, eid, q, k, v, bias, ew, ew_heads, keep, \
                    keep_scale, scale, slope, g, ga, stat, out, attn, dk, dw, o, dq, ob, dob, strides, nthreads, \
                    v_shared, av, ee, dav, dee);                                                        \
  }

GATX_ENTRY(gatx_fused_f32, float)
GATX_ENTRY(gatx_fused_f64, double)

// GATv2's edge score (gatx/nn/gatv2conv.py) straight from the node rows, without (E, H, D)
// pre-activations: over the rows of a CSR (indptr, nbr, eid; a row r and the other endpoint o = nbr[p]
// of its edge e = eid[p]), with an optional per-edge term (edge features, e_rows (E, H, D)),
//   z = a_rows[r] + b_rows[o] (+ e_rows[e])  (H, D),  s[e,h] = sum_d attn[h,d] * lrelu(z[h,d])
// which 0: s (rows are dst nodes, a = fd, b = fs). which 1: from g = dL/ds, with t = g[e,h] * attn[h,d]
// * lrelu'(z): drow[r] = sum over the row's edges of t (the dst pass gives dfd, the src pass over the
// CSC dfs), dedge[e] = t when given, and dattn[h,d] = sum_e g[e,h] * lrelu(z) when given, summed in
// fixed blocks of rows in order (the same bits for any thread count).
// Every row's offsets and every edge's ids are checked before use: 2 when one is out of range.
// Each pass prefetches the other endpoints' rows kAhead edges ahead into L1 and kFar ahead into L2, as the
// attention passes do (the edge rows and g's too): alternating processes, 2 threads, the layer's fwd+bwd
// took 0.54x of its time without at 100k nodes (median of 5 rounds), 0.80x at 10k, and 0.74x at 100k
// with 16 edge features. float32 at 8 heads x 8 features runs with compile-time loop bounds, and the
// forward's head sums are head_dots's (one shuffle tree): the layer's fwd+bwd 0.82-0.83x at 100k nodes,
// 0.77x at 10k (alternating processes, median of 5 rounds; in the profiler forward 63-78 -> 41-57 ms,
// backward 134-154 -> 80-82 ms at 100k). float32 widths of 16, 32 and 64 get a compile-time D for any head
// count: 0.95x with 4 x 32, 0.97x with 8 x 16 (30k nodes, same method).
namespace {
constexpr int64_t kRowBlock = 256;

// out[i] = sum over the blocks b, in order, of part[b * n + i]: a sum that does not depend on which
// thread ran which block
template <typename T>
void sum_blocks(T* out, const T* part, int64_t blocks, int64_t n) {
  std::fill(out, out + n, T(0));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < n; ++i) out[i] += part[b * n + i];
}

template <typename T, int HC, int DC>
int gat2_score_impl(int which, int64_t n_rows, int64_t n_other, int64_t n_edges, int64_t H_, int64_t D_,
                    const int64_t* indptr, const int64_t* nbr, const int64_t* eid, const T* a_rows, const T* b_rows,
                    const T* e_rows, const T* attn, double slope_d, const T* g, T* s, T* drow, T* dedge, T* dattn,
                    int nthreads) {
  const int64_t H = HC ? HC : H_, D = DC ? DC : D_, HD = H * D;
  if (which < 0 || which > 1 || n_rows < 0 || n_other < 0 || n_edges < 0 || H < 0 || D < 0 || !indptr) return 1;
  if (indptr[0] != 0 || indptr[n_rows] != n_edges) return 2;
  if (HD == 0) return 0;  // nothing to read or write
  if ((n_edges > 0 && (!nbr || !eid || !attn || (n_rows > 0 && !a_rows) || (n_other > 0 && !b_rows))) ||
      (which == 0 && n_edges > 0 && !s) || (which == 1 && ((n_edges > 0 && !g) || (n_rows > 0 && !drow))))
    return 1;
  const T slope = static_cast<T>(slope_d);
  const int threads = n_edges * HD < (int64_t(1) << 18) ? 1 : std::max(1, nthreads);
  const int64_t blocks = (n_rows + kRowBlock - 1) / kRowBlock;
  std::unique_ptr<T[]> part;
  if (which == 1 && dattn) {
    part.reset(new (std::nothrow) T[std::max<int64_t>(blocks, 1) * HD]);
    if (!part) return 3;
  }
  bool bad = false, failed = false;
#pragma omp parallel num_threads(threads) reduction(|| : bad, failed)
  {
    std::unique_ptr<T[]> buf(new (std::nothrow) T[2 * HD]);
    failed = !buf;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      if (failed || bad) continue;
      T* z = buf.get();
      T* acc_row = buf.get() + HD;
      T* acc = part ? part.get() + b * HD : nullptr;
      if (acc) std::fill(acc, acc + HD, T(0));
      const int64_t end = std::min(n_rows, (b + 1) * kRowBlock);
      for (int64_t r = b * kRowBlock; r < end && !bad; ++r) {
        const int64_t p0 = indptr[r], p1 = indptr[r + 1];
        if (bad_row(p0, p1, n_edges)) { bad = true; break; }
        const T* ar = a_rows + r * HD;
        if (which == 1) std::fill(acc_row, acc_row + HD, T(0));
        for (int64_t p = p0; p < p1; ++p) {
          // rows ahead (see above); ids not yet checked are safe here (a prefetch never faults)
          if (p + kFar < n_edges) prefetch_row<2>(b_rows, nbr[p + kFar], HD, HD);
          if (p + kAhead < n_edges) {
            const int64_t ea = eid[p + kAhead];
            prefetch_row(b_rows, nbr[p + kAhead], HD, HD);
            if (e_rows) prefetch_row(e_rows, ea, HD, HD);
            if (which == 1) prefetch_row(g, ea, H, H);
          }
          const int64_t o = nbr[p], e = eid[p];
          if (bad_edge(o, e, n_other, n_edges)) { bad = true; break; }
          gat2_preact(ar, b_rows + o * HD, e_rows ? e_rows + e * HD : nullptr, z, HD);
          if (which == 0) {
            gat2_score_of<T, HC, DC>(z, attn, slope, z, s + e * H, H, D);
          } else if (dedge) {
            gat2_edge_grad<T, true, HC, DC>(z, g + e * H, attn, slope, H, D, acc_row, dedge + e * HD, acc);
          } else {
            gat2_edge_grad<T, false, HC, DC>(z, g + e * H, attn, slope, H, D, acc_row, nullptr, acc);
          }
        }
        if (which == 1 && !bad) std::copy(acc_row, acc_row + HD, drow + r * HD);
      }
    }
  }
  if (failed) return 3;
  if (bad) return 2;
  if (which == 1 && dattn) sum_blocks(dattn, part.get(), blocks, HD);
  return 0;
}

// Compile-time loop bounds by the attention passes' rule (run above): float32 at 8 heads x 8 features
// (GATv2Conv's usual shape) or widths 16, 32, 64; float64 and the rest generic
template <typename T>
int gat2_score(int which, int64_t n_rows, int64_t n_other, int64_t n_edges, int64_t H, int64_t D,
               const int64_t* indptr, const int64_t* nbr, const int64_t* eid, const T* a_rows, const T* b_rows,
               const T* e_rows, const T* attn, double slope, const T* g, T* s, T* drow, T* dedge, T* dattn,
               int nthreads) {
  auto impl = gat2_score_impl<T, 0, 0>;
  if (std::is_same<T, float>::value) {
    if (H == 8 && D == 8) impl = gat2_score_impl<T, 8, 8>;
    else if (D == 16) impl = gat2_score_impl<T, 0, 16>;
    else if (D == 32) impl = gat2_score_impl<T, 0, 32>;
    else if (D == 64) impl = gat2_score_impl<T, 0, 64>;
  }
  return impl(which, n_rows, n_other, n_edges, H, D, indptr, nbr, eid, a_rows, b_rows, e_rows, attn, slope, g, s,
              drow, dedge, dattn, nthreads);
}
}  // namespace

#define GATX_GAT2_ENTRY(NAME, T)                                                                           \
  extern "C" int NAME(int which, int64_t n_rows, int64_t n_other, int64_t n_edges, int64_t H, int64_t D,  \
                      const int64_t* indptr, const int64_t* nbr, const int64_t* eid, const T* a_rows,     \
                      const T* b_rows, const T* e_rows, const T* attn, double slope, const T* g, T* s,    \
                      T* drow, T* dedge, T* dattn, int nthreads) {                                        \
    try {                                                                                                 \
      return gat2_score<T>(which, n_rows, n_other, n_edges, H, D, indptr, nbr, eid, a_rows, b_rows,       \
                           e_rows, attn, slope, g, s, drow, dedge, dattn, nthreads);                      \
    } catch (const std::bad_alloc&) {                                                                     \
      return 3;                                                                                           \
    }                                                                                                     \
  }

GATX_GAT2_ENTRY(gatx_gat2_score_f32, float)
GATX_GAT2_ENTRY(gatx_gat2_score_f64, double)

extern "C" int gatx_fused_abi_version() { return 11; }
