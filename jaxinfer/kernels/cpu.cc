// Decode-step kernels for x86-64 CPUs (AVX-512, or AVX2 + FMA: the vector layer is simd.h), as
// XLA FFI calls: float32 matmuls against packed weights (one weight, several weights of one
// input, the fused SwiGLU gate), and attention over the KV cache (float32 or float16) with RoPE
// and the cache write folded in, for one new token per row (decode) or a prefill chunk.
//
// Work is shared between the calling thread and XLA's intra-op thread pool through atomic
// counters (ParallelFor: one contiguous range of items per thread, taken in order, then the
// others' leftovers); the caller never waits for an item nobody has claimed, so a busy pool
// cannot deadlock it.
//
// Matmul: y [M, N] = x [M, K] @ W [K, N], where W is given packed as w [P, K, S] (panel p holds
// columns p*S .. p*S+S-1 of W, zero padded past N; S = kStrip = 48 on every ISA). Every
// kernel's first operand is a layer index: weights and caches may be stacks of layers [L, ...]
// (a scan over the layers passes the whole stack), read and written at that layer in place. Each panel
// is one contiguous stream, read once from memory while up to kRows rows of x (packed k-major)
// are multiplied against it in registers (in one pass over the panel with AVX-512, 3 vectors of
// 16; with AVX2's 16 registers, in two passes of 3 vectors of 8 columns when more than one row
// is multiplied, the second from L1/L2). Row-major [K, N] weights stream badly here (a
// power-of-two row stride maps a panel onto a few cache sets), which is why the weights are
// packed once. More than kRows rows read a panel again from L2 per block of rows (with AVX2, in
// chunks of k rows that stay in L1: kChunkRows); every pass over a panel pulls its part of the
// next panel into L2 meanwhile, so the stream from memory overlaps the arithmetic.
#include "common.h"

namespace {

// One projection y [M, n] = x @ W, W packed as `panels` panels [K, kStrip].
struct Proj {
  const float* w;
  float* y;
  int64_t n, panels;
};

// Rows of k per chunk of a panel when several blocks of rows read it (0: no chunks). With
// AVX2's 16 registers, 16 rows take 8 passes over each panel (4 blocks of rows, 2 passes of
// columns); in chunks of 96 rows (18 KB of panel, 6 KB of x) every pass after the first reads
// the chunk from L1 instead of the whole panel (110-295 KB) from L2. Measured on Zen 4
// (2026-12-07, 30 layers of SmolLM2's projections, 12 rounds alternated in one process): 16
// rows 8-10% less time, 8 and 64 rows 3-7%; on AVX-512 (2 passes at 16 rows) 6-13% more,
// so there the panel is read whole.
constexpr int64_t kChunkRows = simd::kRegs >= 32 ? 0 : 96;

// Runs every panel of every projection on the pool (ParallelFor's items: the panels of
// projection 0, then of projection 1, ...). While a thread multiplies a panel it brings the
// next panel it will take to L2. With several blocks of rows, a panel is read in chunks of
// kChunkRows rows of k, every block and pass over a chunk before the next (the partial sums
// kept in y, or in the GLU's scratch: the same operations in the same order as one pass over
// all of k, so the same sums bit for bit).
// glu: projs is one (gate, up) pair of equal n, and gate's y receives silu(x @ Wg) * (x @ Wu).
void RunProjections(ffi::ThreadPool& pool, const float* xs, int64_t m, int64_t k,
                    const std::vector<Proj>& projs, bool glu) {
  const std::vector<float> packed = PackRows(xs, m, k);
  const size_t listed = glu ? 1 : projs.size();  // a GLU pair is walked as its gate's panels
  const PanelItems items(projs, listed);
  const int64_t blocks = (m + kRows - 1) / kRows;
  const int64_t chunk = kChunkRows > 0 && blocks > 1 ? kChunkRows : k;
  ParallelFor(pool, items.size(), [&](int64_t i, int64_t next) {
    const auto [j, p] = items.Locate(i);
    const Proj& pr = projs[j];
    thread_local std::vector<float> tmp;  // a GLU pair's x @ Wg, x @ Wu [2][m][kStrip]
    if (glu) tmp.resize(2 * m * kStrip);
    const float* ahead[2] = {nullptr, nullptr};  // the next panel of each weight, if any
    if (next >= 0) {
      const auto [nj, np] = items.Locate(next);
      for (int w = 0; w < (glu ? 2 : 1); ++w) ahead[w] = projs[glu ? w : nj].w + np * k * kStrip;
    }
    for (int64_t k0 = 0; k0 < k; k0 += chunk) {
      const int64_t kn = std::min(chunk, k - k0), part = kn / blocks;
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        const int64_t rows = std::min(kRows, m - r0), b = r0 / kRows;
        const float* xp = packed.data() + b * k * kRows + k0 * kRows;
        // Block b brings part b of the chunk's rows of the next panel (of each weight) to L2.
        const auto pf = [&](int w) {
          return ahead[w] ? ahead[w] + (k0 + b * part) * kStrip : nullptr;
        };
        for (int w = 0; w < (glu ? 2 : 1); ++w) {
          const float* panel = (glu ? projs[w].w : pr.w) + (p * k + k0) * kStrip;
          if (glu) {
            kBlocks[rows - 1](xp, panel, tmp.data() + (w * m + r0) * kStrip, kn, kStrip, 0,
                              pf(w), blocks, k0 > 0);
          } else {
            kBlocks[rows - 1](xp, panel, pr.y + r0 * pr.n, kn, pr.n, p * kStrip, pf(0), blocks,
                              k0 > 0);
          }
        }
        if (!glu || k0 + kn < k) continue;
        for (int64_t r = r0; r < r0 + rows; ++r)  // the block's gate, once its sums are whole
          for (int c = 0; c < kCols; ++c) {
            const Vec g = simd::Load(tmp.data() + r * kStrip + kWidth * c);
            const Vec u = simd::Load(tmp.data() + (m + r) * kStrip + kWidth * c);
            StoreHead(pr.y + r * pr.n + p * kStrip + kWidth * c, SiluMul(g, u),
                      pr.n - p * kStrip - kWidth * c);
          }
      }
    }
  });
}

// Layer `layer` of w as packed panels [P, K, kStrip] for y [M, n] with x [M, K] (w is such
// panels, or a stack of them [L, P, K, kStrip]): the Proj, or false when it does not fit.
bool PackedProj(const ffi::Buffer<ffi::F32>& w, int32_t layer, int64_t k, int64_t m, int64_t ym,
                float* y, int64_t n, Proj& out) {
  LayerView v;
  if (!ViewLayer(w.dimensions(), 3, layer, v) || v.dims[2] != kStrip || v.dims[1] != k ||
      ym != m || n > v.dims[0] * kStrip || n <= (v.dims[0] - 1) * kStrip) {
    return false;
  }
  out = Proj{w.typed_data() + v.offset, y, n, v.dims[0]};
  return true;
}

// y [M, N] = x [M, K] @ W, W = w [P, K, 48] or layer `layer` of w [L, P, K, 48].
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  Proj pr;
  if (xd.size() != 2 || yd.size() != 2 ||
      !PackedProj(w, LayerIndex(layer), xd[1], xd[0], yd[0], y->typed_data(), yd[1], pr)) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_matmul_f32: expected x [M, K], w [ceil(N / 48), K, 48] (or [L, ...] holding "
        "the layer), y [M, N]");
  }
  RunProjections(pool, x.typed_data(), xd[0], xd[1], {pr}, false);
  return ffi::Error::Success();
}

// Several projections of one x in one call: x [M, K], w_1 .. w_J (packed, or stacks of which
// layer `layer` is used) -> y_1 .. y_J.
ffi::Error MatmulMany(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
                      ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() != ys.size() || ws.size() == 0) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_matmul_many_f32: expected x [M, K], J weights, J results");
  }
  std::vector<Proj> projs;
  for (size_t j = 0; j < ws.size(); ++j) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(j);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("jaxinfer_matmul_many_f32: float32 buffers expected");
    }
    const auto yd = (*y)->dimensions();
    Proj pr;
    if (yd.size() != 2 ||
        !PackedProj(*w, LayerIndex(layer), xd[1], xd[0], yd[0], (*y)->typed_data(), yd[1], pr)) {
      return ffi::Error::InvalidArgument(
          "jaxinfer_matmul_many_f32: expected w [ceil(N / 48), K, 48] (or [L, ...] holding the "
          "layer), y [M, N] for x [M, K]");
    }
    projs.push_back(pr);
  }
  RunProjections(pool, x.typed_data(), xd[0], xd[1], projs, false);
  return ffi::Error::Success();
}

// The SwiGLU gate in one call: y [M, N] = silu(x @ Wg) * (x @ Wu), both packed (or stacks).
ffi::Error Glu(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
               ffi::Buffer<ffi::F32> wg, ffi::Buffer<ffi::F32> wu, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  Proj g, u;
  if (xd.size() != 2 || yd.size() != 2 ||
      !PackedProj(wg, LayerIndex(layer), xd[1], xd[0], yd[0], y->typed_data(), yd[1], g) ||
      !PackedProj(wu, LayerIndex(layer), xd[1], xd[0], yd[0], y->typed_data(), yd[1], u)) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_glu_f32: expected x [M, K], wg and wu [ceil(N / 48), K, 48] (or [L, ...] "
        "holding the layer), y [M, N]");
  }
  RunProjections(pool, x.typed_data(), xd[0], xd[1], {g, u}, true);
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Attention of one new token per row over the cache.

// Rotates x [H] by the row's RoPE table cs [H] (cos [H/2], then sin [H/2]) into out [H]
// (half-split layout): out = (x1 cos - x2 sin, x2 cos + x1 sin). Scalar and unfused
// (-ffp-contract=off), so the rotated keys equal XLA's bit for bit on every ISA.
void Rotate(const float* x, const float* cs, int64_t H, float* out) {
  const int64_t half = H / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i], s = cs[half + i], x1 = x[i], x2 = x[half + i];
    out[i] = x1 * c - x2 * s;
    out[half + i] = x2 * c + x1 * s;
  }
}

// Cache elements: float32, or float16 (its uint16 bits, F16C) widened to float32 on load and
// rounded to nearest even when the new token is written, as XLA's convert does.
inline Vec LoadKV(const float* p) { return simd::Load(p); }
inline Vec LoadKV(const uint16_t* p) { return simd::LoadHalf(p); }
// The first n (0 <= n <= kWidth) elements at p, zeros after them (nothing past them is read).
inline Vec LoadKVHead(const float* p, int64_t n) { return simd::LoadMasked(p, simd::Head(n)); }
inline Vec LoadKVHead(const uint16_t* p, int64_t n) {
  uint16_t part[kWidth] = {};
  std::copy_n(p, n, part);
  return simd::LoadHalf(part);
}
inline void StoreKV(float* p, float x) { *p = x; }
inline void StoreKV(uint16_t* p, float x) {
  *p = static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}

constexpr int kHeads = 4;  // query heads attended together (one pass over K and V for all)
constexpr int64_t kKeyRows = 8;  // rows of k (of H) per pass over the slots; H % 16 == 0

// Vectors of slots (or of output columns) per step for NQ heads: the most, up to 4, whose
// NQ * J accumulators, J vectors of keys (values) and one broadcast fit in the registers.
constexpr int StepVecs(int heads) {
  for (int j = 4; j > 1; --j)
    if (heads * j + j + 1 <= simd::kRegs) return j;
  return 1;
}

// The keys and values of the item a thread runs next (AttendHeads brings them to L2 while it
// computes the current one, slot for slot as it reads its own: slots below both useds).
template <typename T>
struct Ahead {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t used = 0;
};

// The cache lines of p[0 .. n) (n elements of T) to L2, each once.
template <typename T>
inline void LinesToL2(const T* p, int64_t n) {
  if (n <= 0) return;
  constexpr uintptr_t kBytes = kLine * sizeof(float);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p + n) - 1;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kBytes - 1); a <= last; a += kBytes)
    simd::PrefetchL2(reinterpret_cast<const void*>(a));
}

// out [rows][H] = the mean of v [S, H] over all S slots, in each row.
template <typename T>
void MeanOfValues(const T* v, int64_t S, int64_t H, int rows, float* out) {
  for (int64_t j = 0; j < H; j += kWidth) {
    Vec o = simd::Zero();
    for (int64_t s = 0; s < S; ++s) o = simd::Add(o, LoadKV(v + s * H + j));
    o = simd::Div(o, simd::Set1(static_cast<float>(S)));
    for (int g = 0; g < rows; ++g) simd::Store(out + g * H + j, o);
  }
}

// Partial scores of NQ query rows q [NQ][H] for the kStep = J * kWidth slots from s0, over key
// rows h0 .. h0 + kKeyRows of k [H, S]: scores [NQ][stride] (the first block, h0 = 0, starts
// from zero). kFull: every slot of the block is below `used` (plain loads), else the lanes past
// it are read as zeros and not stored. shade: the block's slots whose keys of the ahead item
// (ahead_k, same layout) are asked for meanwhile. A function of constant J and kFull, so the
// compiler keeps the NQ * J accumulators and J keys in registers (with the loops inline in
// AttendHeads, AVX2 spilled the keys: the many-token kernel ran 1.0-1.1x XLA's attention
// instead of 1.5-2x; forced inline here, a decode step's attention took 1.3-1.8x longer).
template <int NQ, int J, bool kFull, typename T>
void ScoreBlock(
    const float* q, const T* k, int64_t S, int64_t H, int64_t h0, int64_t s0, int64_t used,
    float* scores, int64_t stride, const T* ahead_k, int64_t shade) {
  Vec acc[NQ][J];
  for (int j = 0; j < J; ++j) {
    const bool fresh = h0 == 0 || (!kFull && s0 + kWidth * j >= used);
    for (int g = 0; g < NQ; ++g)
      acc[g][j] = fresh ? simd::Zero() : simd::Load(scores + g * stride + s0 + kWidth * j);
  }
  for (int64_t h = h0; h < h0 + kKeyRows; ++h) {
    const T* kh = k + h * S + s0;
    if (shade > 0) LinesToL2(ahead_k + h * S + s0, shade);
    Vec kv[J];
    for (int j = 0; j < J; ++j) {
      kv[j] = kFull ? LoadKV(kh + kWidth * j)
                    : LoadKVHead(kh + kWidth * j,
                                 std::clamp<int64_t>(used - s0 - kWidth * j, 0, kWidth));
      simd::InRegister(kv[j]);
    }
    for (int g = 0; g < NQ; ++g) {
      const Vec qh = simd::Set1(q[g * H + h]);
      for (int j = 0; j < J; ++j) acc[g][j] = simd::Fma(qh, kv[j], acc[g][j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    if (!kFull && s0 + kWidth * j >= used) break;
    for (int g = 0; g < NQ; ++g) simd::Store(scores + g * stride + s0 + kWidth * j, acc[g][j]);
  }
}

// out [NQ][H] columns j0 .. j0 + NV * kWidth = inv[g] * sum over slots s < used of
// scores[g][s] * v[s] (v [S, H]); the first `shadow` slots' values of the ahead item (ahead_v)
// are asked for meanwhile on the first pass (j0 = 0). Constant NV: registers, as ScoreBlock.
template <int NQ, int NV, typename T>
void ValuePass(
    const float* scores, int64_t stride, const T* v, int64_t used, int64_t H, int64_t j0,
    const Vec* inv, float* out, const T* ahead_v, int64_t shadow) {
  Vec o[NQ][NV];
  for (int g = 0; g < NQ; ++g)
    for (int j = 0; j < NV; ++j) o[g][j] = simd::Zero();
  for (int64_t s = 0; s < used; ++s) {
    if (j0 == 0 && s < shadow) LinesToL2(ahead_v + s * H, H);
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) {
      vv[j] = LoadKV(v + s * H + j0 + kWidth * j);
      simd::InRegister(vv[j]);
    }
    for (int g = 0; g < NQ; ++g) {
      const Vec w = simd::Set1(scores[g * stride + s]);
      for (int j = 0; j < NV; ++j) o[g][j] = simd::Fma(w, vv[j], o[g][j]);
    }
  }
  for (int g = 0; g < NQ; ++g)
    for (int j = 0; j < NV; ++j)
      simd::Store(out + g * H + j0 + kWidth * j, simd::Mul(o[g][j], inv[g]));
}

// ValuePass of nv (1 <= nv <= NV) vectors of columns.
template <int NQ, int NV, typename T>
void ValuePasses(int64_t nv, const float* scores, int64_t stride, const T* v, int64_t used,
                 int64_t H, int64_t j0, const Vec* inv, float* out, const T* ahead_v,
                 int64_t shadow) {
  if constexpr (NV > 1) {
    if (nv < NV)
      return ValuePasses<NQ, NV - 1>(nv, scores, stride, v, used, H, j0, inv, out, ahead_v,
                                     shadow);
  }
  ValuePass<NQ, NV>(scores, stride, v, used, H, j0, inv, out, ahead_v, shadow);
}

// NQ query rows q [NQ][H] of one KV head (heads of one token, or of several tokens) against
// keys k [H, S] (slots last) and values v [S, H]. For row g, slots s < used whose position p
// satisfies 0 <= p <= qpos[g] and qpos[g] - p < window are visible (`used` covers every row's
// visible slots). out [NQ][H] = softmax(q.k / sqrt(H)) v over visible slots; with none visible,
// the mean of v over all S slots (what a softmax over all-equal masked scores gives). A row's
// result depends on its own query and the visible slots alone (masked slots add exact zeros),
// not on the other rows or on `used`.
// scores: scratch [NQ][stride], stride >= used rounded up to 64. T: the cache's element type.
// ahead: the next item's keys and values to ask for meanwhile (none: k == nullptr).
template <int NQ, typename T>
void AttendHeads(const float* q, const T* k, const T* v, const int32_t* kpos,
                 const int32_t* qpos, int32_t window, int64_t used, int64_t S, int64_t H,
                 float* scores, int64_t stride, float* out, Ahead<T> ahead) {
  const int64_t shadow = ahead.k != nullptr ? std::min(used, ahead.used) : 0;
  constexpr int J = StepVecs(NQ);
  constexpr int64_t kStep = J * kWidth;
  const Vec scale = simd::Set1(1.0f / std::sqrt(static_cast<float>(H)));
  const Vec minus_inf = simd::Set1(-INFINITY);
  // q.k in blocks of kKeyRows rows of k: each block streams its rows' used slots in order and
  // adds to the partial scores (in L1). A pass over all H rows per block of slots instead read
  // H rows S floats apart (S a power of two: one L1 set, 4 KB pages) for every block.
  // Per lane the sum still runs over h in order from zero: the same operations as before.
  const int64_t whole = used / kStep * kStep;  // slots in blocks with no lane past `used`
  for (int64_t h0 = 0; h0 < H; h0 += kKeyRows) {
    for (int64_t s0 = 0; s0 < whole; s0 += kStep)
      ScoreBlock<NQ, J, true>(q, k, S, H, h0, s0, used, scores, stride, ahead.k,
                              std::clamp<int64_t>(shadow - s0, 0, kStep));
    if (whole < used)
      ScoreBlock<NQ, J, false>(q, k, S, H, h0, whole, used, scores, stride, ahead.k,
                               std::clamp<int64_t>(shadow - whole, 0, kStep));
  }
  Vec vmax[NQ];
  for (int g = 0; g < NQ; ++g) vmax[g] = minus_inf;
  bool any[NQ] = {};
  const bool same = std::all_of(qpos, qpos + NQ, [&](int32_t p) { return p == qpos[0]; });
  for (int64_t s0 = 0; s0 < used; s0 += kWidth) {  // scale, mask, running max
    const Mask in = simd::Head(used - s0);
    const Mask vis0 = simd::Visible(in, kpos + s0, qpos[0], window);
    for (int g = 0; g < NQ; ++g) {
      const Mask vis = same || g == 0 ? vis0 : simd::Visible(in, kpos + s0, qpos[g], window);
      any[g] |= simd::Any(vis);
      const Vec sc = simd::Mul(simd::Load(scores + g * stride + s0), scale);
      simd::Store(scores + g * stride + s0, simd::Select(vis, sc, minus_inf));
      vmax[g] = simd::Select(vis, simd::Max(vmax[g], sc), vmax[g]);
    }
  }
  if (std::none_of(any, any + NQ, [](bool a) { return a; })) {
    MeanOfValues(v, S, H, NQ, out);
    return;
  }
  Vec inv[NQ];
  for (int g = 0; g < NQ; ++g) {  // probabilities (unnormalised), masked slots exactly 0
    if (!any[g]) {  // all its lanes select 0 below; its output is replaced after the pass
      inv[g] = simd::Zero();
      continue;
    }
    const Vec mx = simd::Set1(simd::ReduceMax(vmax[g]));
    Vec vsum = simd::Zero();
    float* sg = scores + g * stride;
    for (int64_t s0 = 0; s0 < used; s0 += kWidth) {  // lanes past `used` stay in the scratch
      const Vec sc = simd::Load(sg + s0);
      const Mask vis = simd::And(simd::Head(used - s0), simd::NotEqual(sc, minus_inf));
      const Vec e = simd::Select(vis, Exp(simd::Sub(sc, mx)), simd::Zero());
      simd::Store(sg + s0, e);
      vsum = simd::Add(vsum, e);
    }
    inv[g] = simd::Set1(1.0f / simd::ReduceAdd(vsum));
  }
  for (int64_t j0 = 0; j0 < H; j0 += kStep)  // J vectors of output columns per pass over v
    ValuePasses<NQ, J>(std::min<int64_t>(J, (H - j0) / kWidth), scores, stride, v, used, H, j0,
                       inv, out, ahead.v, shadow);
  for (int g = 0; g < NQ; ++g)
    if (!any[g]) MeanOfValues(v, S, H, 1, out + g * H);
}

template <typename T>
using HeadsFn = void (*)(const float*, const T*, const T*, const int32_t*, const int32_t*,
                         int32_t,
                         int64_t, int64_t, int64_t, float*, int64_t, float*, Ahead<T>);
template <typename T>
constexpr HeadsFn<T> kHeadsFns[kHeads] = {&AttendHeads<1, T>, &AttendHeads<2, T>,
                                          &AttendHeads<3, T>, &AttendHeads<4, T>};

template <ffi::DataType D>
int64_t Count(const ffi::Buffer<D>& b) { return static_cast<int64_t>(b.element_count()); }

// One attention call (see Attend): this layer's cache rows ks [R, K, H, S] and vs [R, K, S, H]
// (updated in place), B rows of NT new tokens each (q, k_new, v_new, rope, qpos, slot as
// Attend's operands), kpos, the window and the output; Steps or Chunk runs it.
template <typename T>
struct AttendCall {
  int64_t B, NT, N, H, K, S;
  T* ks;
  T* vs;
  const float *qs, *kn, *vn, *cs;
  const int32_t *qp, *kp, *sl;
  int32_t win;
  float* os;

  void Steps(ffi::ThreadPool& pool) const;
  void Chunk(ffi::ThreadPool& pool) const;

  // New token `tok` (b * NT + t) of KV head kh rotated (through rotated [H], scratch) and
  // written with its value into its slot of the row's cache rows kb [H, S], vb [S, H]; a slot
  // out of range is dropped, as the XLA write does.
  void Write(T* kb, T* vb, int64_t tok, int64_t kh, float* rotated) const {
    const int32_t at = sl[tok];
    if (at < 0 || at >= S) return;
    const int64_t from = (tok * K + kh) * H;
    Rotate(kn + from, cs + tok * H, H, rotated);
    for (int64_t h = 0; h < H; ++h) StoreKV(kb + h * S + at, rotated[h]);
    for (int64_t h = 0; h < H; ++h) StoreKV(vb + at * H + h, vn[from + h]);
  }
};

// One new token per row (a decode step): each (row, KV head) item writes its token and
// attends with its G query heads together, the next item's keys asked for meanwhile.
template <typename T>
void AttendCall<T>::Steps(ffi::ThreadPool& pool) const {
  const int64_t G = N / K;
  const int64_t stride = (S + 63) / 64 * 64;
  // The used slots of item (row b, KV head) b * K + kh.
  auto used_of = [&](int64_t item) {
    return std::min<int64_t>(std::max<int32_t>(sl[item / K] + 1, 0), S);
  };
  // Many strided rows of keys are more streams than the hardware prefetcher follows, so the
  // kernel asks for them itself: an item's first `shadowed` slots while the item before it in
  // the thread's range computes (AttendHeads' Ahead), the rest when the item starts.
  std::unique_ptr<std::atomic<int64_t>[]> shadowed(new std::atomic<int64_t>[B * K]());
  ParallelFor(pool, B * K, [&](int64_t item, int64_t next) {
    const int64_t b = item / K, kh = item % K;
    T* kb = ks + item * H * S;
    T* vb = vs + item * S * H;
    thread_local std::vector<float> scratch;
    scratch.resize(kHeads * stride + (G + 1) * H);
    float* scores = scratch.data();
    float* rq = scores + kHeads * stride;  // rotated q [G][H], then rotated k [H]
    const int64_t n_used = used_of(item);
    const int64_t from = std::min(shadowed[item].load(std::memory_order_relaxed), n_used);
    for (int64_t h = 0; h < H; ++h) LinesToL2(kb + h * S + from, n_used - from);
    LinesToL2(vb + from * H, (n_used - from) * H);
    Ahead<T> ahead;
    if (next >= 0 && qp[b] >= 0) {
      ahead = {ks + next * H * S, vs + next * S * H, used_of(next)};
      shadowed[next].store(std::min(n_used, ahead.used), std::memory_order_relaxed);
    }
    Write(kb, vb, b, kh, rq + G * H);
    if (qp[b] < 0) {  // a padding query (a finished or free row): its output is never read
      std::fill_n(os + (b * N + kh * G) * H, G * H, 0.0f);
      return;
    }
    for (int64_t g = 0; g < G; ++g)
      Rotate(qs + (b * N + kh * G + g) * H, cs + b * H, H, rq + g * H);
    int32_t rows_pos[kHeads];
    std::fill_n(rows_pos, kHeads, qp[b]);
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int64_t nq = std::min<int64_t>(kHeads, G - g0);
      kHeadsFns<T>[nq - 1](rq + g0 * H, kb, vb, kp + b * S, rows_pos, win, n_used, S, H, scores,
                           stride, os + (b * N + kh * G + g0) * H,
                           g0 == 0 ? ahead : Ahead<T>{});
    }
  });
}

// Query rows per AttendHeads call of the many-token kernel: with 16 registers 3 (4 rows' 12
// accumulators, 3 keys and a broadcast left none spare: the compiler spilled the keys).
constexpr int kManyRows = simd::kRegs >= 32 ? 4 : 3;

// Several new tokens per row (a prefill chunk): every token's key is rotated and written with
// its value first, then the tokens attend in groups of kManyRows query rows of one (row, KV
// head), each group reading the keys and values up to the last slot one of its queries sees
// (a causal chunk reads about half the slots of a dense attention).
template <typename T>
void AttendCall<T>::Chunk(ffi::ThreadPool& pool) const {
  const int64_t G = N / K;
  // The chunk's keys (rotated) and values into their slots, one (row, KV head) per item.
  ParallelFor(pool, B * K, [&](int64_t item, int64_t) {
    const int64_t b = item / K, kh = item % K;
    T* kb = ks + item * H * S;
    T* vb = vs + item * S * H;
    thread_local std::vector<float> rotated;
    rotated.resize(H);
    for (int64_t t = 0; t < NT; ++t) Write(kb, vb, b * NT + t, kh, rotated.data());
  });
  const int64_t stride = (S + 63) / 64 * 64;
  // least[b * S + s]: the least position >= 0 in slots s.. of row b (INT32_MAX: none), so the
  // slots a query at position p may see end at the last s with least[s] <= p (least never
  // falls as s grows: a binary search).
  std::vector<int32_t> least(B * S);
  for (int64_t b = 0; b < B; ++b) {
    int32_t m = INT32_MAX;
    for (int64_t s = S - 1; s >= 0; --s) {
      if (kp[b * S + s] >= 0) m = std::min(m, kp[b * S + s]);
      least[b * S + s] = m;
    }
  }
  auto used_by = [&](int64_t b, int32_t p) -> int64_t {  // slots up to the last one p sees
    const int32_t* l = least.data() + b * S;
    return std::upper_bound(l, l + S, p) - l;
  };
  // Items: groups of kManyRows query rows (row r: token r / G, head kh * G + r % G) of one
  // row b and KV head kh, in order, so a thread's consecutive items read the same keys.
  const int64_t rows = NT * G, groups = (rows + kManyRows - 1) / kManyRows;
  ParallelFor(pool, B * K * groups, [&](int64_t item, int64_t) {
    const int64_t bk = item / groups, b = bk / K, kh = bk % K;
    const int64_t r0 = item % groups * kManyRows;
    const int64_t nq = std::min<int64_t>(kManyRows, rows - r0);
    thread_local std::vector<float> scratch;
    scratch.resize(kHeads * stride + 2 * kHeads * H);
    float* scores = scratch.data();
    float* rq = scores + kHeads * stride;  // the group's queries [nq][H], then outputs
    float* ro = rq + kHeads * H;
    int32_t rows_pos[kHeads];
    float* outs[kHeads];  // where each query row's output goes
    int64_t n_used = 0;
    bool real = false;  // a query of the group is not padding
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t tok = b * NT + (r0 + i) / G, head = kh * G + (r0 + i) % G;
      rows_pos[i] = qp[tok];
      outs[i] = os + (tok * N + head) * H;
      Rotate(qs + (tok * N + head) * H, cs + tok * H, H, rq + i * H);
      if (rows_pos[i] < 0) continue;
      real = true;
      n_used = std::max(n_used, used_by(b, rows_pos[i]));
    }
    if (real)  // n_used may be 0 (nothing visible): AttendHeads then gives the mean of v
      kHeadsFns<T>[nq - 1](rq, ks + bk * H * S, vs + bk * S * H, kp + b * S, rows_pos, win,
                           n_used, S, H, scores, stride, ro, Ahead<T>{});
    for (int64_t i = 0; i < nq; ++i) {
      if (rows_pos[i] < 0) std::fill_n(outs[i], H, 0.0f);
      else std::copy_n(ro + i * H, H, outs[i]);
    }
  });
}

// Rotates each row's new tokens by RoPE, writes them into this layer's cache, then attends:
// k [R, K, H, S], v [R, K, S, H], or stacks of them [L, R, ...] of which layer `layer` is this
// one (aliased with the results k_out, v_out: updated in place; R >= B: the B rows attending
// are the first B of the buffers). One token per row (a decode step): q [B, N, H], k_new,
// v_new [B, K, H] (before RoPE), rope [B, H] (cos [H/2], then sin [H/2], of the row's
// position: cos 1 and sin 0 for none), qpos [B], slot [B] (where the new token goes; slots up
// to it are the used ones) -> out [B, N, H]. T tokens per row (a prefill chunk): the same with
// a T axis after B (q [B, T, N, H], ...; slots: the ones whose position a query may see) ->
// out [B, T, N, H]. Both: kpos [B, S] (the new tokens included), window [1]. Query t of row b
// sees the slots whose position p satisfies 0 <= p <= qpos and qpos - p < window. A query
// whose position is negative (padding) is written but attends to nothing: out 0. A slot out
// of range is dropped, as the XLA write does. A chunk's token gets bit for bit what one-token
// calls give it when the chunk's tokens are written and attended one by one: the same
// rotation and operations, the other tokens' slots adding exact zeros.
// H must be a multiple of 16, at most 256. D: the cache's type, F32 or F16 (T its elements).
template <ffi::DataType D, typename T>
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<D> k,
                  ffi::Buffer<D> v, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                  ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> rope,
                  ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                  ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> slot,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<D> k_out,
                  ffi::ResultBuffer<D> v_out) {
  const auto qd = q.dimensions();
  LayerView kl, vl;
  const int32_t li = LayerIndex(layer);
  if (!ViewLayer(k.dimensions(), 4, li, kl) || !ViewLayer(v.dimensions(), 4, li, vl) ||
      k.dimensions().size() != v.dimensions().size()) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_attend: expected k, v [R, K, H, S], [R, K, S, H] or [L, R, ...] holding the "
        "layer");
  }
  const auto& kd = kl.dims;
  const auto& vd = vl.dims;
  const bool chunk = qd.size() == 4;  // else one token per row: q [B, N, H]
  if (qd.size() != 3 && !chunk) return ffi::Error::InvalidArgument("jaxinfer_attend: q rank");
  const int64_t B = qd[0], NT = chunk ? qd[1] : 1, N = qd[qd.size() - 2], H = qd.back();
  const int64_t K = kd[1], S = kd[3];
  if (kd[0] < B || N % K != 0 || kd[2] != H || H % 16 != 0 || H > 256 || vd[0] != kd[0] ||
      vd[1] != K || vd[2] != S || vd[3] != H || kpos.dimensions()[0] != B ||
      kpos.dimensions()[1] != S || window.element_count() != 1 || Count(qpos) != B * NT ||
      Count(slot) != B * NT || Count(k_new) != B * NT * K * H ||
      Count(v_new) != B * NT * K * H || Count(rope) != B * NT * H) {
    return ffi::Error::InvalidArgument("jaxinfer_attend: unexpected shapes");
  }
  T* ks = k_out->typed_data();
  T* vs = v_out->typed_data();
  if (ks != k.typed_data()) std::copy_n(k.typed_data(), k.element_count(), ks);
  if (vs != v.typed_data()) std::copy_n(v.typed_data(), v.element_count(), vs);
  const AttendCall<T> call{B, NT, N, H, K, S, ks + kl.offset, vs + vl.offset,
                           q.typed_data(), k_new.typed_data(), v_new.typed_data(),
                           rope.typed_data(), qpos.typed_data(), kpos.typed_data(),
                           slot.typed_data(), window.typed_data()[0], out->typed_data()};
  if (chunk) call.Chunk(pool);
  else call.Steps(pool);
  return ffi::Error::Success();
}

}  // namespace

// What the library was compiled for: jaxinfer.kernels checks both when it loads it.
extern "C" __attribute__((visibility("default"))) const char* JaxinferIsa() { return simd::kIsa; }
extern "C" __attribute__((visibility("default"))) int64_t JaxinferStrip() { return kStrip; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMatmulManyF32, MatmulMany,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferGluF32, Glu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The attention binding for a cache of type D (the other arguments are float32 / int32).
template <ffi::DataType D>
auto AttendBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferAttendF32, (Attend<ffi::F32, float>),
                              AttendBinding<ffi::F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferAttendF16, (Attend<ffi::F16, uint16_t>),
                              AttendBinding<ffi::F16>());
