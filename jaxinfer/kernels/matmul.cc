// Float32 matmul on AVX-512 CPUs against weights packed in column panels, an XLA FFI call.
//
// y [M, N] = x [M, K] @ W [K, N], where W is given packed as w [P, K, S] (panel p holds columns
// p*S .. p*S+S-1 of W, zero padded past N; S = kStrip). Each panel is one contiguous stream,
// read once from memory while up to kRows rows of x (packed k-major) are multiplied against it
// in registers; panels are shared between the calling thread and XLA's intra-op thread pool
// through an atomic counter. The caller never waits for a panel nobody has claimed, so a busy
// pool cannot deadlock it. Row-major [K, N] weights stream badly here (a power-of-two row
// stride maps a panel onto a few cache sets), which is why the weights are packed once.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;    // rows of x per register block
constexpr int64_t kCols = 3;    // zmm registers per row of a block
constexpr int64_t kStrip = 16 * kCols;  // S: columns per panel
constexpr int64_t kAhead = 16;  // panel rows prefetched ahead

// y[r, n0 + j] = sum_k x[r, k] * panel[k, j] for R rows; xp is x packed [K][kRows].
template <int R>
void Block(const float* xp, const float* panel, float* y, int64_t K, int64_t N, int64_t n0) {
  __m512 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* wk = panel;
  for (int64_t k = 0; k < K; ++k, wk += kStrip) {
    for (int c = 0; c < kCols; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wk + kAhead * kStrip + 16 * c), _MM_HINT_T0);
    }
    __m512 wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = _mm512_loadu_ps(wk + 16 * c);
    const float* xk = xp + k * kRows;
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(xk[r]);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_fmadd_ps(xb, wv[c], acc[r][c]);
    }
  }
  for (int c = 0; c < kCols; ++c) {
    const int64_t left = N - n0 - 16 * c;
    const __mmask16 m = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * N + n0 + 16 * c, m, acc[r][c]);
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);

template <int... R>
constexpr auto MakeTable(std::integer_sequence<int, R...>) {
  return std::array<BlockFn, sizeof...(R)>{&Block<R + 1>...};
}
constexpr auto kBlocks = MakeTable(std::make_integer_sequence<int, kRows>{});

struct Job {
  const float* w;
  float* y;
  int64_t m, k, n, panels, chunk, chunks;
  std::vector<float> packed;  // x as [row blocks][K][kRows], zero padded
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void RunChunks(Job& job) {
  for (;;) {
    const int64_t c = job.next.fetch_add(1);
    if (c >= job.chunks) return;
    const int64_t p_end = std::min(job.panels, (c + 1) * job.chunk);
    for (int64_t p = c * job.chunk; p < p_end; ++p) {
      const float* panel = job.w + p * job.k * kStrip;
      for (int64_t r0 = 0; r0 < job.m; r0 += kRows) {
        const int64_t rows = std::min(kRows, job.m - r0);
        kBlocks[rows - 1](job.packed.data() + (r0 / kRows) * job.k * kRows, panel,
                          job.y + r0 * job.n, job.k, job.n, p * kStrip);
      }
    }
    job.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kStrip ||
      xd[1] != wd[1] || yd[0] != xd[0] || yd[1] > wd[0] * kStrip ||
      yd[1] <= (wd[0] - 1) * kStrip) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_matmul_f32: expected x [M, K], w [ceil(N / 48), K, 48], y [M, N]");
  }
  auto job = std::make_shared<Job>();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->m = xd[0];
  job->k = xd[1];
  job->n = yd[1];
  job->panels = wd[0];
  const float* xs = x.typed_data();
  job->packed.assign(((job->m + kRows - 1) / kRows) * job->k * kRows, 0.0f);
  for (int64_t r = 0; r < job->m; ++r) {
    float* dst = job->packed.data() + (r / kRows) * job->k * kRows + r % kRows;
    const float* src = xs + r * job->k;
    for (int64_t k = 0; k < job->k; ++k) dst[k * kRows] = src[k];
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->chunk = std::max<int64_t>(1, job->panels / (4 * threads));
  job->chunks = (job->panels + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) {
    pool.Schedule([job] { RunChunks(*job); });
  }
  RunChunks(*job);
  while (job->done.load(std::memory_order_acquire) < job->chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
