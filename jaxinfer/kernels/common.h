// Shared parts of the kernel sources (cpu.cc: float32 matmul and attention; quant.cc:
// quantized matmul): the float32 register-blocked matmul over a packed panel, the thread
// pool loop, exp / SiluMul, and the packing of x rows. Everything is in an anonymous
// namespace, so each source has its own copy.
#ifndef JAXINFER_KERNELS_COMMON_H_
#define JAXINFER_KERNELS_COMMON_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using simd::kWidth;
using simd::Mask;
using simd::Vec;

constexpr int64_t kStrip = 48;              // S: columns per panel (Python's kernels.STRIP)
constexpr int64_t kCols = kStrip / kWidth;  // vectors per panel row: 3 (AVX-512) or 6 (AVX2)
constexpr int64_t kLine = 16;               // floats per cache line
static_assert(kStrip % kWidth == 0 && kStrip % kLine == 0, "panel rows: whole vectors and lines");
// A weight operand: one layer's weight of `rank` dimensions, or a stack of them [L, ...] of
// which the call's `layer` (an int32 scalar operand) is used, read in place (a scan over the
// layers passes the whole stack: slicing it would copy the layer at every step).
struct LayerView {
  std::vector<int64_t> dims;  // the layer's dimensions (`rank` of them)
  int64_t offset = 0;         // elements from the buffer's start to the layer's data
};

// The view of buffer dimensions d as one layer's `rank`-dimensional weight; false when d is
// neither that nor a stack of them holding `layer` (an unstacked weight needs layer 0).
template <typename Dims>
bool ViewLayer(const Dims& d, size_t rank, int32_t layer, LayerView& v) {
  const size_t n = d.size();
  if (n != rank && n != rank + 1) return false;
  const size_t first = n - rank;
  if (first == 1 ? (layer < 0 || layer >= d[0]) : layer != 0) return false;
  v.dims.clear();
  int64_t per = 1;
  for (size_t i = first; i < n; ++i) {
    v.dims.push_back(d[i]);
    per *= d[i];
  }
  v.offset = first ? layer * per : 0;
  return true;
}

// The layer index a call was given (an int32 buffer of one element), or -1 if it is not one.
inline int32_t LayerIndex(const ffi::Buffer<ffi::S32>& layer) {
  return layer.element_count() == 1 ? layer.typed_data()[0] : -1;
}

constexpr int64_t kRows = simd::kRegs >= 32 ? 8 : 4;  // rows of x per register block
constexpr int64_t kAhead = simd::kAheadL1;  // panel rows prefetched ahead into L1
constexpr int64_t kFar = simd::kAheadL2;    // and into L2

// Vectors of columns per pass over a panel for R rows: the most (a divisor of kCols) whose
// R * C accumulators, C weight vectors and one broadcast of x fit in the registers. AVX-512:
// 3 (the whole panel row) for up to 8 rows; AVX2: 6 for one row, else 3 (two passes of 24
// columns; measured on Zen 3, 4 rows x 24 columns beat 6 rows x 16 at 16 rows, lost at 64).
constexpr int PassCols(int rows) {
  for (int c = kCols; c > 1; --c)
    if (kCols % c == 0 && rows * c + c + 1 <= simd::kRegs) return c;
  return 1;
}

// Vectors of columns y[r, n0 + (C0 + c) * kWidth] for c < C of R rows: sum_k x[r, k] *
// panel[k, .]; xp is x packed [K][kRows]. pf (optional): panel rows to bring into L2
// meanwhile, one every `every` steps of k (part of the next panel, while this one is read from
// L2 again for more rows or columns: the memory stream never stops). The first pass (C0 == 0)
// asks for the whole panel row ahead (L2 and L1), later passes for their own columns only (L1).
// add: the sums go on from y's values (a later chunk of k, see cpu.cc's kChunkRows) instead of
// from zero.
template <int R, int C, int C0>
void BlockCols(const float* xp, const float* panel, float* y, int64_t K, int64_t N, int64_t n0,
               const float* pf, int64_t every, bool add) {
  constexpr int64_t kFirst = C0 * kWidth / kLine * kLine, kLast = (C0 + C) * kWidth;
  Vec acc[R][C];
  for (int c = 0; c < C; ++c) {
    const int64_t col = n0 + (C0 + c) * kWidth, left = N - col;
    for (int r = 0; r < R; ++r)
      acc[r][c] = !add || left <= 0 ? simd::Zero()
                  : left >= kWidth  ? simd::Load(y + r * N + col)
                                    : simd::LoadMasked(y + r * N + col, simd::Head(left));
  }
  const float* wk = panel;
  int64_t count = 0;
  for (int64_t k = 0; k < K; ++k, wk += kStrip) {
    if constexpr (kAhead > 0) {
      for (int64_t f = kFirst; f < kLast; f += kLine) simd::PrefetchL1(wk + kAhead * kStrip + f);
    }
    if constexpr (C0 == 0 && kFar > 0) {
      for (int64_t f = 0; f < kStrip; f += kLine) simd::PrefetchL2(wk + kFar * kStrip + f);
    }
    if (pf != nullptr && ++count == every) {
      count = 0;
      for (int64_t f = 0; f < kStrip; f += kLine) simd::PrefetchL2(pf + f);
      pf += kStrip;
    }
    Vec wv[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = simd::Load(wk + (C0 + c) * kWidth);
      simd::InRegister(wv[c]);
    }
    const float* xk = xp + k * kRows;
    for (int r = 0; r < R; ++r) {
      const Vec xb = simd::Set1(xk[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = simd::Fma(xb, wv[c], acc[r][c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t col = n0 + (C0 + c) * kWidth, left = N - col;
    if (left <= 0) break;
    for (int r = 0; r < R; ++r) {
      if (left >= kWidth) {
        simd::Store(y + r * N + col, acc[r][c]);
      } else {
        simd::StoreMasked(y + r * N + col, simd::Head(left), acc[r][c]);
      }
    }
  }
}

// The passes of C vectors from column vector C0 on, skipping those wholly past N (padding).
// pf is this block's share of the next panel (every: its blocks of rows); each pass brings
// its own part of that share to L2. Measured on the Xeon of docs/CPU_RESULTS.md (2026-12-07):
// at 16 rows (AVX2, a harness), with ParallelFor's per-thread ranges, 14-19% less time than
// the first pass alone asking for it, within a quarter of a projection's panels; at one row
// (a single pass, the batch-1 stream) 14-44% more tokens/s on AVX2 and 1-8% on AVX-512 than
// without it. On AMD's CPUs the batch-1 stream runs as fast or faster without it (Zen 4,
// 2026-12-07, median +9.5% on AVX2 and +2% on AVX-512; on Zen 3 the in-panel kAhead / kFar
// prefetches slowed batch 1 too), so there jaxinfer.kernels (VENDOR_FLAGS) builds with
// JAXINFER_ONE_PASS_PREFETCH 0: a panel read in a single pass asks for nothing.
#ifndef JAXINFER_ONE_PASS_PREFETCH
#define JAXINFER_ONE_PASS_PREFETCH 1
#endif
template <int R, int C, int C0 = 0>
void Passes(const float* xp, const float* panel, float* y, int64_t K, int64_t N, int64_t n0,
            const float* pf, int64_t every, bool add) {
  constexpr int64_t kPasses = kCols / C, kPass = C0 / C;
  const int64_t share = every * kPasses;
  const bool ask = pf != nullptr && (JAXINFER_ONE_PASS_PREFETCH || share > 1);
  const float* mine = ask ? pf + kPass * (K / share) * kStrip : nullptr;
  BlockCols<R, C, C0>(xp, panel, y, K, N, n0, mine, share, add);
  if constexpr (C0 + C < kCols) {
    if (n0 + (C0 + C) * kWidth < N) Passes<R, C, C0 + C>(xp, panel, y, K, N, n0, pf, every, add);
  }
}

// y[r, n0 .. n0 + kStrip) (columns below N) = x rows @ panel for R rows (+ y when add), in
// passes of PassCols(R) vectors; pf / every as in Passes.
template <int R>
void Block(const float* xp, const float* panel, float* y, int64_t K, int64_t N, int64_t n0,
           const float* pf, int64_t every, bool add) {
  Passes<R, PassCols(R)>(xp, panel, y, K, N, n0, pf, every, add);
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                         const float*, int64_t, bool);

template <int... R>
constexpr auto MakeTable(std::integer_sequence<int, R...>) {
  return std::array<BlockFn, sizeof...(R)>{&Block<R + 1>...};
}
constexpr auto kBlocks = MakeTable(std::make_integer_sequence<int, kRows>{});

// Runs fn(i, next) for i in [0, n) on the caller and the pool's threads. The items are cut into
// one contiguous range per thread; a thread takes its own range's items in order, one at a
// time, then helps with the ranges of the others. next is the item after i in i's range (-1 at
// its end): the one this thread most likely runs next, whose data fn may prefetch meanwhile.
struct alignas(kLine * sizeof(float)) Counter {
  std::atomic<int64_t> next{0};
};

struct Parallel {
  std::function<void(int64_t, int64_t)> fn;
  int64_t n = 0, ranges = 1;
  std::unique_ptr<Counter[]> counters;  // the next unclaimed item of each range
  std::atomic<int64_t> workers{0};
  std::atomic<int64_t> done{0};
};

void Drain(Parallel& p) {
  const int64_t me = p.workers.fetch_add(1) % p.ranges;
  for (int64_t d = 0; d < p.ranges; ++d) {
    const int64_t r = (me + d) % p.ranges, end = (r + 1) * p.n / p.ranges;
    for (;;) {
      const int64_t i = p.counters[r].next.fetch_add(1);
      if (i >= end) break;
      p.fn(i, i + 1 < end ? i + 1 : -1);
      p.done.fetch_add(1, std::memory_order_release);
    }
  }
}

constexpr int kSpins = 1024;  // pauses (tens of microseconds) before the waiting caller yields

void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t, int64_t)> fn) {
  auto p = std::make_shared<Parallel>();
  p->fn = std::move(fn);
  p->n = n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  p->ranges = std::max<int64_t>(1, std::min(threads, n));
  p->counters = std::make_unique<Counter[]>(p->ranges);
  for (int64_t r = 0; r < p->ranges; ++r) p->counters[r].next = r * n / p->ranges;
  for (int64_t t = 1; t < p->ranges; ++t) pool.Schedule([p] { Drain(*p); });
  Drain(*p);
  // Items claimed by helpers are running; wait for them (fn may use the caller's stack),
  // giving the core away when they take long (on a busy machine a helper may be preempted).
  for (int spins = 0; p->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < kSpins) {
      simd::Pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// The panels of the first `listed` projections (each with a `panels` count) as one run of
// items: projection 0's panels, then projection 1's, ...
struct PanelItems {
  std::vector<int64_t> starts{0};  // the item of each projection's first panel, then the count

  template <typename P>
  PanelItems(const std::vector<P>& projs, size_t listed) {
    for (size_t j = 0; j < listed; ++j) starts.push_back(starts.back() + projs[j].panels);
  }
  int64_t size() const { return starts.back(); }
  // item -> (projection, panel)
  std::pair<size_t, int64_t> Locate(int64_t i) const {
    const size_t j = std::upper_bound(starts.begin(), starts.end(), i) - starts.begin() - 1;
    return {j, i - starts[j]};
  }
};

// exp(x) per lane (Cephes expf polynomial, ~1 ulp), x clamped to [-87.3, 88.7].
inline Vec Exp(Vec x) {
  using simd::Set1;
  x = simd::Min(simd::Max(x, Set1(-87.3f)), Set1(88.7f));
  const Vec n = simd::RoundNearest(simd::Mul(x, Set1(1.44269504088896341f)));
  Vec r = simd::Fnma(n, Set1(0.693359375f), x);
  r = simd::Fnma(n, Set1(-2.12194440e-4f), r);
  Vec p = Set1(1.9875691500e-4f);
  p = simd::Fma(p, r, Set1(1.3981999507e-3f));
  p = simd::Fma(p, r, Set1(8.3334519073e-3f));
  p = simd::Fma(p, r, Set1(4.1665795894e-2f));
  p = simd::Fma(p, r, Set1(1.6666665459e-1f));
  p = simd::Fma(p, r, Set1(5.0000001201e-1f));
  p = simd::Fma(simd::Mul(p, r), r, simd::Add(r, Set1(1.0f)));
  return simd::Ldexp(p, n);
}

// silu(g) * u per lane: g / (1 + exp(-g)) * u.
inline Vec SiluMul(Vec g, Vec u) {
  const Vec e = Exp(simd::Sub(simd::Zero(), g));
  return simd::Mul(simd::Div(g, simd::Add(simd::Set1(1.0f), e)), u);
}

// Stores the first min(n, kWidth) lanes of v at p (none for n <= 0).
inline void StoreHead(float* p, Vec v, int64_t n) {
  if (n >= kWidth) {
    simd::Store(p, v);
  } else if (n > 0) {
    simd::StoreMasked(p, simd::Head(n), v);
  }
}

// x [M, K] row-major -> packed [ceil(M / kRows)][K][kRows] (rows past M zero).
std::vector<float> PackRows(const float* xs, int64_t m, int64_t k) {
  std::vector<float> packed(((m + kRows - 1) / kRows) * k * kRows, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    float* dst = packed.data() + (r / kRows) * k * kRows + r % kRows;
    for (int64_t i = 0; i < k; ++i) dst[i * kRows] = xs[r * k + i];
  }
  return packed;
}

}  // namespace

#endif  // JAXINFER_KERNELS_COMMON_H_
