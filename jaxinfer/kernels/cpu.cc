// Decode-step kernels for AVX-512 CPUs, as XLA FFI calls: a float32 matmul against packed
// weights, and single-query attention over the KV cache.
//
// Work is shared between the calling thread and XLA's intra-op thread pool through an atomic
// counter (ParallelFor); the caller never waits for an item nobody has claimed, so a busy pool
// cannot deadlock it.
//
// Matmul: y [M, N] = x [M, K] @ W [K, N], where W is given packed as w [P, K, S] (panel p holds columns
// p*S .. p*S+S-1 of W, zero padded past N; S = kStrip). Each panel is one contiguous stream,
// read once from memory while up to kRows rows of x (packed k-major) are multiplied against it
// in registers. Row-major [K, N] weights stream badly here (a power-of-two row
// stride maps a panel onto a few cache sets), which is why the weights are packed once.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
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

// Runs fn(i) for i in [0, n) on the caller and the pool's threads.
struct Parallel {
  std::function<void(int64_t)> fn;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Parallel& p) {
  for (;;) {
    const int64_t i = p.next.fetch_add(1);
    if (i >= p.n) return;
    p.fn(i);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  auto p = std::make_shared<Parallel>();
  p->fn = std::move(fn);
  p->n = n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule([p] { Drain(*p); });
  Drain(*p);
  // Items claimed by helpers are running; wait for them (fn may use the caller's stack).
  while (p->done.load(std::memory_order_acquire) < n) _mm_pause();
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
  const int64_t m = xd[0], k = xd[1], n = yd[1], panels = wd[0];
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  std::vector<float> packed(((m + kRows - 1) / kRows) * k * kRows, 0.0f);  // [blocks][K][kRows]
  for (int64_t r = 0; r < m; ++r) {
    float* dst = packed.data() + (r / kRows) * k * kRows + r % kRows;
    for (int64_t i = 0; i < k; ++i) dst[i * kRows] = xs[r * k + i];
  }
  const int64_t chunk = std::max<int64_t>(1, panels / (4 * std::max<int64_t>(1, pool.num_threads())));
  ParallelFor(pool, (panels + chunk - 1) / chunk, [&](int64_t c) {
    for (int64_t p = c * chunk; p < std::min(panels, (c + 1) * chunk); ++p) {
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        kBlocks[std::min(kRows, m - r0) - 1](packed.data() + (r0 / kRows) * k * kRows,
                                             ws + p * k * kStrip, ys + r0 * n, k, n, p * kStrip);
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Attention of one new token per row over the cache.

// exp(x) for 16 lanes (Cephes expf polynomial, ~1 ulp), x clamped to [-87.3, 88.7].
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 Tail(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

// One query q [H] against keys k [H, S] (slots last) and values v [S, H] of one KV head.
// Slots s < used whose position p satisfies 0 <= p <= qpos and qpos - p < window are visible.
// out [H] = softmax(q.k / sqrt(H)) v over visible slots; with none visible, the mean of v over
// all S slots (what a softmax over all-equal masked scores gives).
void AttendOne(const float* q, const float* k, const float* v, const int32_t* kpos,
               int32_t qpos, int32_t window, int64_t used, int64_t S, int64_t H, float* scores,
               float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const __m512i qp = _mm512_set1_epi32(qpos), win = _mm512_set1_epi32(window);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  bool any = false;
  for (int64_t s0 = 0; s0 < used; s0 += 64) {  // four independent 16-slot accumulators
    __mmask16 in[4];
    __m512 acc[4];
    for (int j = 0; j < 4; ++j) {
      in[j] = Tail(used - s0 - 16 * j);
      acc[j] = _mm512_setzero_ps();
    }
    for (int64_t h = 0; h < H; ++h) {
      const __m512 qh = _mm512_set1_ps(q[h]);
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm512_fmadd_ps(qh, _mm512_maskz_loadu_ps(in[j], k + h * S + s0 + 16 * j), acc[j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      if (!in[j]) break;
      const __m512i p = _mm512_maskz_loadu_epi32(in[j], kpos + s0 + 16 * j);
      const __mmask16 vis = in[j] & _mm512_cmpge_epi32_mask(p, _mm512_setzero_si512()) &
                            _mm512_cmple_epi32_mask(p, qp) &
                            _mm512_cmplt_epi32_mask(_mm512_sub_epi32(qp, p), win);
      const __m512 sc = _mm512_mul_ps(acc[j], _mm512_set1_ps(scale));
      _mm512_storeu_ps(scores + s0 + 16 * j, _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), sc));
      vmax = _mm512_mask_max_ps(vmax, vis, vmax, sc);
      any |= vis != 0;
    }
  }
  const int64_t hv = H / 16;
  __m512 o[16];
  for (int64_t j = 0; j < hv; ++j) o[j] = _mm512_setzero_ps();
  if (!any) {
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < hv; ++j) o[j] = _mm512_add_ps(o[j], _mm512_loadu_ps(v + s * H + 16 * j));
    for (int64_t j = 0; j < hv; ++j)
      _mm512_storeu_ps(out + 16 * j, _mm512_div_ps(o[j], _mm512_set1_ps(static_cast<float>(S))));
    return;
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < used; s0 += 16) {
    const __mmask16 in = Tail(used - s0);
    const __m512 sc = _mm512_maskz_loadu_ps(in, scores + s0);
    const __mmask16 vis = in & _mm512_cmp_ps_mask(sc, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(vis, Exp(_mm512_sub_ps(sc, mx)));
    _mm512_mask_storeu_ps(scores + s0, in, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  for (int64_t s = 0; s < used; ++s) {
    const float w = scores[s];
    if (w == 0.0f) continue;
    const __m512 wb = _mm512_set1_ps(w);
    for (int64_t j = 0; j < hv; ++j) o[j] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(v + s * H + 16 * j), o[j]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t j = 0; j < hv; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(o[j], inv));
}

// Writes one new token per row into this layer's cache, then attends:
// k [B, K, H, S], v [B, K, S, H] (aliased with the results k_out, v_out: updated in place),
// q [B, N, H], k_new, v_new [B, K, H], qpos [B], kpos [B, S], window [1], slot [B] (where the
// new token goes; slots up to it are the used ones) -> out [B, N, H], k_out, v_out.
// H must be a multiple of 16, at most 256.
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                  ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> qpos,
                  ffi::Buffer<ffi::S32> kpos, ffi::Buffer<ffi::S32> window,
                  ffi::Buffer<ffi::S32> slot, ffi::ResultBuffer<ffi::F32> out,
                  ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] ||
      qd[1] % kd[1] != 0 || kd[2] != qd[2] || qd[2] % 16 != 0 || qd[2] > 256 ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[3] || vd[3] != kd[2] ||
      kpos.dimensions()[1] != kd[3] || window.element_count() != 1 ||
      k_new.element_count() != kd[0] * kd[1] * kd[2] ||
      v_new.element_count() != kd[0] * kd[1] * kd[2]) {
    return ffi::Error::InvalidArgument("jaxinfer_attend_f32: unexpected shapes");
  }
  const int64_t B = qd[0], N = qd[1], H = qd[2], K = kd[1], S = kd[3], G = N / K;
  float* ks = k_out->typed_data();
  float* vs = v_out->typed_data();
  if (ks != k.typed_data()) std::copy_n(k.typed_data(), k.element_count(), ks);
  if (vs != v.typed_data()) std::copy_n(v.typed_data(), v.element_count(), vs);
  const float* qs = q.typed_data();
  const float* kn = k_new.typed_data();
  const float* vn = v_new.typed_data();
  const int32_t* qp = qpos.typed_data();
  const int32_t* kp = kpos.typed_data();
  const int32_t* sl = slot.typed_data();
  const int32_t win = window.typed_data()[0];
  float* os = out->typed_data();
  ParallelFor(pool, B * K, [&](int64_t item) {
    const int64_t b = item / K, kh = item % K;
    float* kb = ks + item * H * S;
    float* vb = vs + item * S * H;
    if (sl[b] >= 0 && sl[b] < S) {  // out of range: dropped, as the XLA write does
      for (int64_t h = 0; h < H; ++h) kb[h * S + sl[b]] = kn[item * H + h];
      std::copy_n(vn + item * H, H, vb + sl[b] * H);
    }
    const int64_t n_used = std::min<int64_t>(std::max<int32_t>(sl[b] + 1, 0), S);
    thread_local std::vector<float> scores;
    scores.resize(S + 64);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t head = kh * G + g;
      AttendOne(qs + (b * N + head) * H, kb, vb, kp + b * S, qp[b], win, n_used, S, H,
                scores.data(), os + (b * N + head) * H);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferAttendF32, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
