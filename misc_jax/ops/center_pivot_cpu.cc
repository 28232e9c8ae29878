// The centre-pivot 4D convolution on CPU, read straight off the volume: forward, input gradient, kernel
// gradients. Built on first use by misc_jax/ops/center_pivot_cpu.py (which says why it exists and when it
// is used); that file's XLA formulation is the definition this code must equal.
//
// Volume x [B, Ha, Wa, Hb, Wb, C] (row-major, float32); kernels ka [k0, k1, C, O] (source dims) and
// kb [k2, k3, C, O] (target dims); strides s[4], padding p[4]. Output y [B, Ha', Wa', Hb', Wb', O]:
//   y[b, a0, a1, b0, b1] =   sum_{i, j} x[b, a0 s0 + i - p0, a1 s1 + j - p1, b0 s2, b1 s3] . ka[i, j]
//                          + sum_{i, j} x[b, a0 s0, a1 s1, b0 s2 + i - p2, b1 s3 + j - p3] . kb[i, j]
//                          + bias
// (zero outside the volume; bias [O] is the sum of the two branches' biases). Every output is written
// once and no transposed copy of the volume is made, which is where XLA's two 2D convolutions lose their
// time.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One register of floats (GCC's vector extension): 16 with AVX-512, else 8 (two SSE registers on CPUs
// without AVX). Written out because the compiler's own vectorisation of these loops shuffled lanes
// instead of multiplying them.
#ifdef __AVX512F__
typedef float Vec __attribute__((vector_size(64)));
#else
typedef float Vec __attribute__((vector_size(32)));
#endif

template <typename V>
constexpr int kLanes = sizeof(V) / sizeof(float);

template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void AddTo(float* p, V v) {
  V u = Load<V>(p) + v;
  std::memcpy(p, &u, sizeof u);
}

struct Geometry {
  int64_t in[5];   // B, Ha, Wa, Hb, Wb of the volume
  int64_t out[5];  // the same of the output
  int64_t c, o;    // channels in, out
  int64_t k[4], s[4], p[4];
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, ffi::Span<const int64_t> ka,
                      ffi::Span<const int64_t> kb, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  Geometry g;
  for (int d = 0; d < 5; ++d) g.in[d] = x[d], g.out[d] = y[d];
  g.c = x[5], g.o = y[5];
  g.k[0] = ka[0], g.k[1] = ka[1], g.k[2] = kb[0], g.k[3] = kb[1];
  for (int d = 0; d < 4; ++d) g.s[d] = strides[d], g.p[d] = padding[d];
  return g;
}

// Runs f(lo, hi) over [0, n) in about 4 ranges per thread of XLA's intra-op pool (the pool that runs
// XLA's own CPU kernels, so no threads are started per call and none compete with it). Workers claim ranges
// from a counter and the caller works too, so the loop also finishes where the pool runs nothing in
// parallel; the state lives on the heap because a late task may start after the caller has returned.
template <typename F>
void ParallelFor(int64_t n, ffi::ThreadPool& pool, F f) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t ranges = std::max<int64_t>(1, std::min(n, 4 * threads));
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::function<void(int64_t)> range;
  };
  auto state = std::make_shared<State>();
  state->range = [&](int64_t t) { f(n * t / ranges, n * (t + 1) / ranges); };
  auto work = [](State& s, int64_t ranges) {
    for (int64_t t; (t = s.next.fetch_add(1)) < ranges;) {
      s.range(t);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, ranges); ++t) pool.Schedule([state, ranges, work] { work(*state, ranges); });
  work(*state, ranges);
  while (state->done.load(std::memory_order_acquire) < ranges) std::this_thread::yield();
}

// The source index, along a convolved dim, that output index q reads at tap t (forward: q s + t - p), or
// that input index q is read from (transposed: (q + p - t) / s when s divides it); -1 when there is none.
// num = s * quotient + remainder with 0 <= remainder < s (also for negative num); strides are 1 or 2
// nearly always, and a division costs more than the work of a cell here.
inline int64_t FloorDiv(int64_t num, int64_t s, int64_t* remainder) {
  if (s == 1) return *remainder = 0, num;
  if (s == 2) return *remainder = num & 1, num >> 1;  // arithmetic shift: floor
  int64_t q = num / s, r = num % s;
  if (r < 0) r += s, --q;
  return *remainder = r, q;
}

template <bool kTransposed>
inline int64_t Source(int64_t q, int64_t t, int64_t s, int64_t p, int64_t size) {
  int64_t a;
  if (kTransposed) {
    const int64_t num = q + p - t;
    int64_t r;
    a = FloorDiv(num, s, &r);
    if (num < 0 || r) return -1;
  } else {
    a = q * s + t - p;
  }
  return a >= 0 && a < size ? a : -1;
}

// A tap of one branch that reaches a row of cells (dims 0..3 fixed): the offset in src of its source
// along dims 0..3, and which tap it is (index i * kj + j within the branch's kernel).
struct Tap {
  int64_t base, index, j;
  int branch;
};

// The taps of both branches that reach the row `cell` (dims 0..3), with their sources along dims 0..3.
template <bool kTransposed>
void RowTaps(const Geometry& g, const int64_t cell[4], std::vector<Tap>& taps) {
  const int64_t* sdim = kTransposed ? g.out : g.in;
  const int64_t n = kTransposed ? g.o : g.c;
  int64_t step[5];  // src strides along dims 0..4
  step[4] = n;
  for (int d = 3; d >= 0; --d) step[d] = step[d + 1] * sdim[d + 1];
  taps.clear();
  for (int branch = 0; branch < 2; ++branch) {
    // Source branch: taps over dims 1, 2 at the cell's strided dims 3, 4; target branch the other way.
    const int d0 = branch == 0 ? 1 : 3;
    const int64_t ki = g.k[d0 - 1], kj = g.k[d0];
    for (int64_t i = 0; i < ki; ++i)
      for (int64_t j = 0; j < kj; ++j) {
        int64_t base = cell[0] * step[0];
        bool inside = true;
        for (int t = 0; t < 3 && inside; ++t) {
          const int d = t + 1;
          int64_t at;
          if (d == d0 || d == d0 + 1) {
            at = Source<kTransposed>(cell[d], d == d0 ? i : j, g.s[t], g.p[t], sdim[d]);
          } else if (kTransposed) {  // a strided dim: read only where the stride divides
            int64_t r;
            at = FloorDiv(cell[d], g.s[t], &r);
            if (r) at = -1;
          } else {
            at = cell[d] * g.s[t];
          }
          inside = at >= 0 && at < sdim[d];
          base += at * step[d];
        }
        if (inside) taps.push_back({base, i * kj + j, j, branch});
      }
  }
}

// P cells along the last dim (first, first + spacing, ...; `count` <= P of them): dst = b + the sum over
// both branches' taps of src . w (b: the bias of dst's channels from o0, padded to whole vectors). Cells
// without a source at a tap read `zeros`, so the inner loops have no branch and the accumulators stay in
// registers. Two ways to vectorise:
// - wide (NV vectors of outputs): `w` is [k, k, n, ld] per branch, the reduced channel (n) second to
//   last; columns [wcol, ...) are read and the first `lanes` of the NV vectors go to dst's channels
//   [o0, o0 + lanes). Each source value is broadcast against a row of weights.
// - narrow (kNarrow: NV = m outputs, fewer than a vector; n a multiple of the lanes): `w` is
//   [k, k, m, n], and vectors run along the reduced channels, summed across lanes once at the end. For the
//   input gradient into 3 channels, where a wide vector would be mostly padding.
template <int P, typename V, int NV, bool kTransposed, bool kNarrow = false>
void Segment(const float* __restrict src, float* __restrict dst, const float* const w[2], int64_t ld,
             int64_t wcol, const Geometry& g, const std::vector<Tap>& taps, int64_t first, int64_t spacing,
             int64_t count, int64_t o0, int64_t lanes, const float* zeros, const float* b) {
  const int64_t* sdim = kTransposed ? g.out : g.in;  // src: the volume (forward) or dy (transposed)
  const int64_t n = kTransposed ? g.o : g.c, m = kTransposed ? g.c : g.o;
  V acc[P][NV] = {};
  const float* from[P];
  for (const Tap& tap : taps) {
    {
      {
        const int d0 = tap.branch == 0 ? 1 : 3, branch = tap.branch;
        const int64_t j = tap.j, base = tap.base;
        // Dim 4: the P cells' sources are `delta` apart from the first one's, at0 (no division per cell).
        int64_t at0, delta;
        if (kTransposed) {  // cells `spacing` = s3 apart: the stride divides all of them or none
          const int64_t s3 = g.s[3], num = first + (d0 == 3 ? g.p[3] - j : 0);
          int64_t r;
          at0 = FloorDiv(num, s3, &r), delta = 1;
          if (r) continue;
        } else {
          at0 = first * g.s[3] + (d0 == 3 ? j - g.p[3] : 0), delta = g.s[3];
        }
        bool any = false;
        for (int p = 0; p < P; ++p) {
          const int64_t at = at0 + p * delta;
          const bool ok = p < count && at >= 0 && at < sdim[4];
          from[p] = ok ? src + base + at * n : zeros;
          any |= ok;
        }
        if (!any) continue;
        if constexpr (kNarrow) {
          const float* wt = w[branch] + tap.index * NV * n;
          for (int64_t c = 0; c < n; c += kLanes<V>) {
            V wc[NV];
            for (int v = 0; v < NV; ++v) wc[v] = Load<V>(wt + v * n + c);
            for (int p = 0; p < P; ++p) {
              const V x = Load<V>(from[p] + c);
              for (int v = 0; v < NV; ++v) acc[p][v] += x * wc[v];
            }
          }
          continue;
        }
        const float* wt = w[branch] + tap.index * n * ld + wcol;
        for (int64_t c = 0; c < n; ++c) {
          V wc[NV];
          for (int v = 0; v < NV; ++v) wc[v] = Load<V>(wt + c * ld + v * kLanes<V>);
          for (int p = 0; p < P; ++p) {
            const V x = from[p][c] - V{};  // a broadcast (x - 0 is x, and compiles to nothing)
            for (int v = 0; v < NV; ++v) acc[p][v] += x * wc[v];
          }
        }
      }
    }
  }
  if constexpr (kNarrow) {
    for (int p = 0; p < count; ++p)
      for (int v = 0; v < NV; ++v) {
        float sum = b[v];
        for (int l = 0; l < kLanes<V>; ++l) sum += acc[p][v][l];
        dst[spacing * p * m + v] = sum;
      }
  } else {
    V bias[NV];
    for (int v = 0; v < NV; ++v) bias[v] = Load<V>(b + v * kLanes<V>);
    for (int p = 0; p < count; ++p) {
      for (int v = 0; v < NV; ++v) acc[p][v] += bias[v];
      std::memcpy(dst + spacing * p * m + o0, &acc[p][0], lanes * sizeof(float));
    }
  }
}

template <bool kTransposed, int P, typename V, int NV, bool kNarrow = false>
void Segments(const float* src, float* row, const float* const w[2], int64_t ld, int64_t wcol, const Geometry& g,
              const std::vector<Tap>& taps, int64_t o0, int64_t lanes, const float* zeros, const float* b) {
  const int64_t last = (kTransposed ? g.in : g.out)[4], m = kTransposed ? g.c : g.o;
  // The input gradient under a stride s along the last dim: s interleaved phases of cells s apart, which
  // share the taps that reach them (forward: one phase of consecutive cells).
  const int64_t spacing = kTransposed ? g.s[3] : 1;
  for (int64_t phase = 0; phase < spacing; ++phase) {
    const int64_t cells = (last - phase + spacing - 1) / spacing;
    for (int64_t k = 0; k < cells; k += P) {
      const int64_t first = phase + k * spacing;
      Segment<P, V, NV, kTransposed, kNarrow>(src, row + first * m, w, ld, wcol, g, taps, first, spacing,
                                     std::min<int64_t>(P, cells - k), o0, lanes, zeros, b + o0);
    }
  }
}

// dst = bias + the convolution of src (forward), or its transpose (the input gradient; bias null).
template <bool kTransposed>
void Gather(const float* src, float* dst, const float* const w[2], const float* bias, const Geometry& g,
            ffi::ThreadPool& pool) {
  const int64_t* ddim = kTransposed ? g.in : g.out;  // dst: the output (forward) or dx (transposed)
  const int64_t n = kTransposed ? g.o : g.c, m = kTransposed ? g.c : g.o;
  const std::vector<float> zeros(n, 0.f);
  // The last m % L channels through a copy of their weight columns padded with zeros to one vector.
  constexpr int64_t L = kLanes<Vec>;
  const int64_t m8 = m - m % L;
  std::vector<float> biases(m8 + 2 * L, 0.f);  // whole vectors from any o0
  if (bias) std::copy(bias, bias + m, biases.begin());
  const float* b = biases.data();
  std::vector<float> tail[2];
  const float* tails[2];
  for (int branch = 0; branch < 2; ++branch) {
    const int64_t rows = g.k[2 * branch] * g.k[2 * branch + 1] * n;
    tail[branch].assign(rows * L, 0.f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = m8; o < m; ++o) tail[branch][r * L + o - m8] = w[branch][r * m + o];
    tails[branch] = tail[branch].data();
  }
  // At most 4 outputs and whole vectors of reduced channels: the narrow way, with w transposed.
  const bool narrow = m <= 4 && n % L == 0;
  std::vector<float> transposed[2];
  const float* columns[2];
  for (int branch = 0; branch < 2 && narrow; ++branch) {
    const int64_t taps = g.k[2 * branch] * g.k[2 * branch + 1];
    transposed[branch].resize(taps * n * m);
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < n; ++c)
        for (int64_t o = 0; o < m; ++o) transposed[branch][(t * m + o) * n + c] = w[branch][(t * n + c) * m + o];
    columns[branch] = transposed[branch].data();
  }
  const int64_t rows = ddim[0] * ddim[1] * ddim[2] * ddim[3];  // rows along the last dim, over the pool
  const int64_t spacing = kTransposed ? g.s[3] : 1;
  const int64_t row_cells = (ddim[4] + spacing - 1) / spacing;  // cells of a row per phase
  const bool short_rows = row_cells <= 4;
  ParallelFor(rows, pool, [&](int64_t lo, int64_t hi) {
    std::vector<Tap> taps;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t cell[4] = {r / (ddim[1] * ddim[2] * ddim[3]), r / (ddim[2] * ddim[3]) % ddim[1],
                               r / ddim[3] % ddim[2], r % ddim[3]};
      RowTaps<kTransposed>(g, cell, taps);
      float* row = dst + r * ddim[4] * m;
      if (narrow) {
        switch (m) {
          case 1: Segments<kTransposed, 12, Vec, 1, true>(src, row, columns, 0, 0, g, taps, 0, 1, zeros.data(), b); break;
          case 2: Segments<kTransposed, 8, Vec, 2, true>(src, row, columns, 0, 0, g, taps, 0, 2, zeros.data(), b); break;
          case 3:
            if (row_cells <= 8) Segments<kTransposed, 4, Vec, 3, true>(src, row, columns, 0, 0, g, taps, 0, 3, zeros.data(), b);
            else Segments<kTransposed, 6, Vec, 3, true>(src, row, columns, 0, 0, g, taps, 0, 3, zeros.data(), b);
            break;
          default: Segments<kTransposed, 4, Vec, 4, true>(src, row, columns, 0, 0, g, taps, 0, 4, zeros.data(), b);
        }
        continue;
      }
      int64_t o0 = 0;
      // Registers: P x NV accumulators, NV weights and a broadcast (of 16 with AVX2, 32 with AVX-512).
      // Rows of at most 4 cells (a strided target's last dim) take segments of 4, not 6 or 12 mostly empty.
      if (short_rows) {
        for (; o0 + 2 * L <= m; o0 += 2 * L)
          Segments<kTransposed, 4, Vec, 2>(src, row, w, m, o0, g, taps, o0, 2 * L, zeros.data(), b);
        for (; o0 + L <= m; o0 += L) Segments<kTransposed, 4, Vec, 1>(src, row, w, m, o0, g, taps, o0, L, zeros.data(), b);
        if (o0 < m) Segments<kTransposed, 4, Vec, 1>(src, row, tails, L, 0, g, taps, o0, m - o0, zeros.data(), b);
        continue;
      }
      for (; o0 + 2 * L <= m; o0 += 2 * L)
        Segments<kTransposed, 6, Vec, 2>(src, row, w, m, o0, g, taps, o0, 2 * L, zeros.data(), b);
      if (row_cells <= 8) {  // rows of 5-8 cells: segments of 8
        for (; o0 + L <= m; o0 += L) Segments<kTransposed, 8, Vec, 1>(src, row, w, m, o0, g, taps, o0, L, zeros.data(), b);
        if (o0 < m) Segments<kTransposed, 8, Vec, 1>(src, row, tails, L, 0, g, taps, o0, m - o0, zeros.data(), b);
        continue;
      }
      for (; o0 + L <= m; o0 += L) Segments<kTransposed, 12, Vec, 1>(src, row, w, m, o0, g, taps, o0, L, zeros.data(), b);
      if (o0 < m) Segments<kTransposed, 12, Vec, 1>(src, row, tails, L, 0, g, taps, o0, m - o0, zeros.data(), b);
    }
  });
}

// Kernel gradient of one branch, one tap, channels [c0, c0 + CB) x outputs [o0, o0 + OB), over the
// output cells of rows [lo, hi): accumulators held in registers across the cells.
template <int CB, typename V, int NV>
void TapGrad(const float* __restrict x, const float* __restrict dy, float* __restrict grad, const Geometry& g,
             int branch, int64_t i, int64_t j, int64_t c0, int64_t o0, int64_t lo, int64_t hi) {
  V acc[CB][NV] = {};
  int64_t xstep[5], ystep[5];
  xstep[4] = g.c, ystep[4] = g.o;
  for (int d = 3; d >= 0; --d) xstep[d] = xstep[d + 1] * g.in[d + 1], ystep[d] = ystep[d + 1] * g.out[d + 1];
  const int64_t shift[4] = {branch == 0 ? i - g.p[0] : 0, branch == 0 ? j - g.p[1] : 0,
                            branch == 1 ? i - g.p[2] : 0, branch == 1 ? j - g.p[3] : 0};
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t bb = r / g.out[1], a0 = r % g.out[1];
    const int64_t x0 = a0 * g.s[0] + shift[0];
    if (x0 < 0 || x0 >= g.in[1]) continue;
    for (int64_t a1 = 0; a1 < g.out[2]; ++a1) {
      const int64_t x1 = a1 * g.s[1] + shift[1];
      if (x1 < 0 || x1 >= g.in[2]) continue;
      for (int64_t b0 = 0; b0 < g.out[3]; ++b0) {
        const int64_t x2 = b0 * g.s[2] + shift[2];
        if (x2 < 0 || x2 >= g.in[3]) continue;
        const float* xr = x + bb * xstep[0] + x0 * xstep[1] + x1 * xstep[2] + x2 * xstep[3] + c0;
        const float* yr = dy + bb * ystep[0] + a0 * ystep[1] + a1 * ystep[2] + b0 * ystep[3] + o0;
        // b1's range with the fourth coordinate inside the volume.
        const int64_t s3 = g.s[3], sh = shift[3];
        const int64_t b1lo = sh >= 0 ? 0 : (-sh + s3 - 1) / s3;
        const int64_t b1hi = std::min(g.out[4], (g.in[4] - 1 - sh) / s3 + 1);
        for (int64_t b1 = b1lo; b1 < b1hi; ++b1) {
          const float* xv = xr + (b1 * s3 + sh) * g.c;
          const float* dv = yr + b1 * g.o;
          V d[NV];
          for (int v = 0; v < NV; ++v) d[v] = Load<V>(dv + v * kLanes<V>);
          for (int c = 0; c < CB; ++c) {
            const V x = xv[c] - V{};
            for (int v = 0; v < NV; ++v) acc[c][v] += x * d[v];
          }
        }
      }
    }
  }
  float* out = grad + ((i * g.k[branch == 0 ? 1 : 3] + j) * g.c + c0) * g.o + o0;
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) AddTo<V>(out + c * g.o + v * kLanes<V>, acc[c][v]);
}

template <typename V, int NV>
void TapGradChannels(const float* x, const float* dy, float* grad, const Geometry& g, int branch, int64_t i,
                     int64_t j, int64_t o0, int64_t lo, int64_t hi) {
  int64_t c0 = 0;
  // Registers: CB x NV accumulators, NV rows of dy and a broadcast.
  if (NV == 1)
    for (; c0 + 16 <= g.c; c0 += 16) TapGrad<16, V, NV>(x, dy, grad, g, branch, i, j, c0, o0, lo, hi);
  for (; c0 + 8 <= g.c; c0 += 8) TapGrad<8, V, NV>(x, dy, grad, g, branch, i, j, c0, o0, lo, hi);
  for (; c0 + 4 <= g.c; c0 += 4) TapGrad<4, V, NV>(x, dy, grad, g, branch, i, j, c0, o0, lo, hi);
  for (; c0 + 2 <= g.c; c0 += 2) TapGrad<2, V, NV>(x, dy, grad, g, branch, i, j, c0, o0, lo, hi);
  for (; c0 < g.c; ++c0) TapGrad<1, V, NV>(x, dy, grad, g, branch, i, j, c0, o0, lo, hi);
}

void KernelGrads(const float* x, const float* dy, float* ga, float* gb, const Geometry& g, ffi::ThreadPool& pool) {
  const int64_t rows = g.out[0] * g.out[1];
  // One partial sum per range of rows, added up at the end in a fixed order (results do not depend on
  // which thread ran what).
  const int64_t ranges = std::max<int64_t>(1, std::min(rows, std::max<int64_t>(1, pool.num_threads())));
  const int64_t sa = g.k[0] * g.k[1] * g.c * g.o, sb = g.k[2] * g.k[3] * g.c * g.o;
  std::vector<std::vector<float>> parts(ranges, std::vector<float>(sa + sb, 0.f));
  ParallelFor(ranges, pool, [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const int64_t lo = rows * t / ranges, hi = rows * (t + 1) / ranges;
      float* grads[2] = {parts[t].data(), parts[t].data() + sa};
      // Rows in blocks, taps inside: a block's cells stay in cache across the taps.
      const int64_t block = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.out[2] * g.out[3] * g.out[4]));
      for (int64_t r = lo; r < hi; r += block) {
        const int64_t r1 = std::min(hi, r + block);
        for (int branch = 0; branch < 2; ++branch)
          for (int64_t i = 0; i < g.k[2 * branch]; ++i)
            for (int64_t j = 0; j < g.k[2 * branch + 1]; ++j) {
              int64_t o0 = 0;
              constexpr int64_t L = kLanes<Vec>;
              for (; o0 + 2 * L <= g.o; o0 += 2 * L)
                TapGradChannels<Vec, 2>(x, dy, grads[branch], g, branch, i, j, o0, r, r1);
              for (; o0 + L <= g.o; o0 += L) TapGradChannels<Vec, 1>(x, dy, grads[branch], g, branch, i, j, o0, r, r1);
              for (; o0 < g.o; ++o0) TapGradChannels<float, 1>(x, dy, grads[branch], g, branch, i, j, o0, r, r1);
            }
      }
    }
  });
  for (int64_t e = 0; e < sa + sb; ++e) {
    float v = 0.f;
    for (int64_t t = 0; t < ranges; ++t) v += parts[t][e];
    (e < sa ? ga[e] : gb[e - sa]) = v;
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ka, ffi::Buffer<ffi::F32> kb,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, ffi::ThreadPool pool) {
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), ka.dimensions(), kb.dimensions(), strides,
                                  padding);
  const float* w[2] = {ka.typed_data(), kb.typed_data()};
  Gather<false>(x.typed_data(), y->typed_data(), w, bias.typed_data(), g, pool);
  return ffi::Error::Success();
}

// kat, kbt: the kernels with their channel axes swapped, [k, k, O, C].
ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kat, ffi::Buffer<ffi::F32> kbt,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding, ffi::ThreadPool pool) {
  auto kad = kat.dimensions(), kbd = kbt.dimensions();
  const int64_t ka_shape[4] = {kad[0], kad[1], kad[3], kad[2]}, kb_shape[4] = {kbd[0], kbd[1], kbd[3], kbd[2]};
  const Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), ffi::Span<const int64_t>(ka_shape, 4),
                                  ffi::Span<const int64_t>(kb_shape, 4), strides, padding);
  const float* w[2] = {kat.typed_data(), kbt.typed_data()};
  Gather<true>(dy.typed_data(), dx->typed_data(), w, nullptr, g, pool);
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> ga,
                      ffi::ResultBuffer<ffi::F32> gb, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding, ffi::ThreadPool pool) {
  const Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), ga->dimensions(), gb->dimensions(), strides,
                                  padding);
  KernelGrads(x.typed_data(), dy.typed_data(), ga->typed_data(), gb->typed_data(), g, pool);
  return ffi::Error::Success();
}

}  // namespace

#define MISC_JAX_BIND(first, second, results)                                                   \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>() first second results \
      .Attr<ffi::Span<const int64_t>>("strides")                                                  \
      .Attr<ffi::Span<const int64_t>>("padding")                                                  \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(CenterPivotForward, Forward,
                              MISC_JAX_BIND(.Arg<ffi::Buffer<ffi::F32>>(), .Arg<ffi::Buffer<ffi::F32>>(),
                                            .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CenterPivotInputGrad, InputGrad,
                              MISC_JAX_BIND(.Arg<ffi::Buffer<ffi::F32>>(), , .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CenterPivotKernelGrad, KernelGrad,
                              MISC_JAX_BIND(, .Ret<ffi::Buffer<ffi::F32>>(), .Ret<ffi::Buffer<ffi::F32>>()));
