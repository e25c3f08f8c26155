// Matmuls against quantized weights kept in panels (XLA FFI calls), for every quantized format
// jaxinfer has (int8 per channel, int4 group-wise, GGUF Q8_0 / Q4_0 / Q4_1): jaxinfer.kernels
// repacks each into one of two panel layouts at load.
//
// A weight W [K, N] is panels like the float32 weights (panel p: columns p*S .. p*S+S-1, zero
// padded past N; S = kStrip = 48), in groups of G rows of k that share a scale per column:
//   8-bit: q int8 [P, K, S];                    W[k, c] = q[k, c] * scale[k / G, c]
//   4-bit: q uint8 [P, K / 8, S, 4]: the 4 bytes (j, c) hold rows 8j .. 8j + 3 of k (low
//          nibbles) and 8j + 4 .. 8j + 7 (high nibbles), values 0..15, G a multiple of 32;
//                                               W[k, c] = q[k, c] * scale[k / G, c] + min[k / G, c]
// scales [P, K / G, S] float32 or float16, mins [P, K / G, S] float16 (4-bit only; a
// symmetric format has min = -8 * scale). Each may also be a stack of layers [L, ...], read at
// the call's layer in place.
//
// 8-bit weights take float32 activations. One row of x (a decode step at batch 1, memory
// bound): each group's dot with the integers is summed in registers and scaled once per group;
// more rows: a chunk of the panel is dequantized into a float32 scratch in L1/L2 once, and the
// float32 register-blocked matmul of common.h runs over it for every block of rows.
//
// 4-bit weights take x quantized per row in blocks of 32 (as llama.cpp's Q8 activations):
// d = max |x| / 127 over the block, xq = round(x * 127 / max |x|) in int8, so the result is
// q8(x) @ W with q8(x) = d * xq. The products are integer dot products (maddubs on AVX2, summed
// in int16 over a block of 32 k, then to int32): far fewer instructions per weight than
// converting nibbles to floats, which bound the float path. Up to 4 rows of x share each
// unpacked weight vector (the panel stays in L1/L2 across row blocks), and every row runs the
// same operations in the same order, so a row's result does not depend on how many rows a call
// has.
#include "common.h"

namespace {

constexpr int64_t kChunk = 128;  // rows of k dequantized at a time for several rows of x
// Bytes of a panel prefetched ahead into L1 while it streams: the hardware prefetchers alone
// left 48-byte 8-bit rows at about half the float32 kernel's bandwidth (docs/CPU_RESULTS.md,
// 2026-12-06).
constexpr int64_t kAheadBytes = 6144;

// One quantized projection y [M, n] = x @ W (see the file comment).
struct QProj {
  const void* q;
  const void* s;         // float or uint16 (float16 bits)
  const uint16_t* mins;  // 4-bit only
  float* y;
  int64_t n, panels, group;
  int bits;
  bool half;  // scales are float16
};

inline Vec LoadScale(const float* p) { return simd::Load(p); }
inline Vec LoadScale(const uint16_t* p) { return simd::LoadHalf(p); }

// Vectors of columns per pass for one row of 8-bit weights: the most (a divisor of kCols) whose
// C accumulators, C group sums, a broadcast and a weight vector fit in the registers (AVX2 6,
// AVX-512 3: the whole panel row in one pass).
constexpr int RowCols() {
  for (int c = kCols; c > 1; --c)
    if (kCols % c == 0 && 2 * c + 4 <= simd::kRegs) return c;
  return 1;
}

// tile[C0 * kWidth .. (C0 + C) * kWidth) = x [K] @ the 8-bit panel's columns there; q, s point
// at the panel (see the file comment).
template <typename ST, int C, int C0>
void RowCols(const float* x, const void* q, const ST* s, int64_t K, int64_t G, float* tile) {
  Vec acc[C];
  for (int c = 0; c < C; ++c) acc[c] = simd::Zero();
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    Vec part[C];  // sum over the group of x * q
    for (int c = 0; c < C; ++c) part[c] = simd::Zero();
    const int8_t* qk = static_cast<const int8_t*>(q) + g0 * kStrip + C0 * kWidth;
    for (int64_t k = g0; k < g0 + G; ++k, qk += kStrip) {
      if constexpr (C0 == 0) simd::PrefetchL1(qk + kAheadBytes);
      const Vec xb = simd::Set1(x[k]);
      for (int c = 0; c < C; ++c) part[c] = simd::Fma(xb, simd::LoadI8(qk + c * kWidth), part[c]);
    }
    const ST* sg = s + g * kStrip + C0 * kWidth;
    for (int c = 0; c < C; ++c) acc[c] = simd::Fma(part[c], LoadScale(sg + c * kWidth), acc[c]);
  }
  for (int c = 0; c < C; ++c) simd::Store(tile + (C0 + c) * kWidth, acc[c]);
}

template <typename ST, int C0 = 0>
void Row(const float* x, const void* q, const ST* s, int64_t K, int64_t G, float* tile) {
  constexpr int C = RowCols();
  RowCols<ST, C, C0>(x, q, s, K, G, tile);
  if constexpr (C0 + C < kCols) Row<ST, C0 + C>(x, q, s, K, G, tile);
}

// x quantized per row in blocks of kBlock (see the file comment): xq int8 [M, K], d [M, K /
// kBlock] and sum [M, K / kBlock] = d * (sum of xq over the block).
constexpr int64_t kBlock = 32;
struct QuantRows {
  std::vector<int8_t> xq;
  std::vector<float> d, sum;
};

QuantRows QuantizeRows(const float* x, int64_t m, int64_t k) {
  QuantRows out{std::vector<int8_t>(m * k), std::vector<float>(m * k / kBlock),
                std::vector<float>(m * k / kBlock)};
  static_assert(kBlock % kWidth == 0, "whole vectors per block");
  constexpr int kVecs = kBlock / kWidth;
  const Vec lo = simd::Set1(-127.0f), hi = simd::Set1(127.0f);
  for (int64_t b = 0; b < m * k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    Vec v[kVecs], amax = simd::Zero();
    for (int i = 0; i < kVecs; ++i) {
      v[i] = simd::Load(xb + i * kWidth);
      amax = simd::Max(amax, simd::Max(v[i], simd::Sub(simd::Zero(), v[i])));  // |x|
    }
    const float a = simd::ReduceMax(amax);
    const Vec inv = simd::Set1(a > 0.0f ? 127.0f / a : 0.0f);
    Vec total = simd::Zero();  // small integers: exact in float32
    for (int i = 0; i < kVecs; ++i) {
      // round(x * 127 / amax) to nearest even, clamped to [-127, 127]
      const Vec r = simd::Min(simd::Max(simd::RoundNearest(simd::Mul(v[i], inv)), lo), hi);
      simd::StoreI8(out.xq.data() + b * kBlock + i * kWidth, r);
      total = simd::Add(total, r);
    }
    out.d[b] = a / 127.0f;
    out.sum[b] = out.d[b] * simd::ReduceAdd(total);
  }
  return out;
}

// Rows of x per pass of the integer loop: each unpacked weight vector serves this many rows.
// All row blocks run over kDotK rows of k (6 KB of a 4-bit panel: it stays in L1) before the
// next kDotK.
constexpr int kDotRows = 4;
constexpr int64_t kDotK = 256;

// Vectors of columns per pass of the integer loop for R rows: R * C int16 sums, C low and C
// high nibble vectors, a quad of x, the nibble mask and two products in the registers.
template <int R>
constexpr int DotCols() {
  for (int c = kCols; c > 1; --c)
    if (kCols % c == 0 && R * c + 2 * c + 4 <= simd::kRegs) return c;
  return 1;
}

// tile rows 0 .. R-1, columns C0 * kWidth .. (C0 + C) * kWidth += q8(x) rows r0 .. r0 + R - 1,
// k in [kb, ke) @ the 4-bit panel's columns there (kb == 0: = instead of +=); q, s, mins point
// at the panel, K is its depth. Per block of 32 k, each row's integer dot (int16 pairs over
// the block, then int32) is added to its float32 result as acc + dot * (d * scale) + sum * min:
// the same operations in the same order for every row, whatever R is, so a row's result does
// not depend on the other rows of the call.
template <int R, int C, int C0>
void DotRowsCols(const QuantRows& x, int64_t r0, const uint8_t* q, const uint16_t* s,
                 const uint16_t* mins, int64_t K, int64_t kb, int64_t ke, int64_t G,
                 float* tile) {
  const int64_t blocks = K / kBlock;
  // the scales' group of k0, counted, not divided (a 64-bit idiv per block held ~5% of this
  // function's perf samples in a prefill)
  int64_t g = kb / G, g_end = (g + 1) * G;
  for (int64_t k0 = kb; k0 < ke; k0 += kBlock) {
    if (k0 == g_end) ++g, g_end += G;
    simd::IVec pairs[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) pairs[r][c] = simd::IZero();
    const uint8_t* qk = q + k0 / 8 * kStrip * 4 + C0 * kWidth * 4;
    for (int64_t k = k0; k < k0 + kBlock; k += 8, qk += kStrip * 4) {
      simd::IVec lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const simd::IVec w = simd::LoadBytes(qk + c * kWidth * 4);
        lo[c] = simd::LowNibbles(w);
        hi[c] = simd::HighNibbles(w);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = x.xq.data() + (r0 + r) * K + k;
        const simd::IVec x0 = simd::Quad(xr), x1 = simd::Quad(xr + 4);
        for (int c = 0; c < C; ++c) pairs[r][c] = simd::DotPairs(pairs[r][c], lo[c], x0, hi[c], x1);
      }
    }
    const int64_t b = k0 / kBlock;
    for (int c = 0; c < C; ++c) {
      const Vec sc = simd::LoadHalf(s + g * kStrip + (C0 + c) * kWidth);
      const Vec mn = simd::LoadHalf(mins + g * kStrip + (C0 + c) * kWidth);
      for (int r = 0; r < R; ++r) {
        float* t = tile + r * kStrip + (C0 + c) * kWidth;
        const int64_t rb = (r0 + r) * blocks + b;
        const Vec dot = simd::ToFloat(simd::SumPairs(pairs[r][c]));
        Vec acc = k0 == 0 ? simd::Zero() : simd::Load(t);
        acc = simd::Fma(dot, simd::Mul(simd::Set1(x.d[rb]), sc), acc);
        simd::Store(t, simd::Fma(simd::Set1(x.sum[rb]), mn, acc));
      }
    }
  }
}

template <int R, int C0 = 0>
void DotRows(const QuantRows& x, int64_t r0, const uint8_t* q, const uint16_t* s,
             const uint16_t* mins, int64_t K, int64_t kb, int64_t ke, int64_t G, float* tile) {
  constexpr int C = DotCols<R>();
  DotRowsCols<R, C, C0>(x, r0, q, s, mins, K, kb, ke, G, tile);
  if constexpr (C0 + C < kCols) DotRows<R, C0 + C>(x, r0, q, s, mins, K, kb, ke, G, tile);
}

// out [kc][kStrip] = W rows k0 .. k0 + kc of the 8-bit panel, as float32.
template <typename ST>
void Dequant(const int8_t* q, const ST* s, int64_t G, int64_t k0, int64_t kc, float* out) {
  for (int64_t k = k0; k < k0 + kc; ++k) {
    const ST* sg = s + k / G * kStrip;
    float* o = out + (k - k0) * kStrip;
    for (int c = 0; c < kCols; ++c)
      simd::Store(o + c * kWidth, simd::Mul(simd::LoadI8(q + k * kStrip + c * kWidth),
                                            LoadScale(sg + c * kWidth)));
  }
}

// The inputs of a call: x row-major (xs, for one row), packed for the register blocks (xp, for
// several rows of 8-bit weights), quantized (xq, for 4-bit weights).
struct Inputs {
  const float* xs;
  const float* xp;
  const QuantRows* xq;
};

// tile [M][kStrip] = x [M, K] @ panel p of the 8-bit w; scratch holds kChunk * kStrip floats.
template <typename ST>
void Panel8(const QProj& w, int64_t p, const Inputs& in, int64_t m, int64_t K, float* tile,
            float* scratch) {
  const int8_t* q = static_cast<const int8_t*>(w.q) + p * K * kStrip;
  const ST* s = static_cast<const ST*>(w.s) + p * (K / w.group) * kStrip;
  if (m == 1) {
    Row<ST>(in.xs, q, s, K, w.group, tile);
    return;
  }
  const float* xp = in.xp;
  alignas(64) float part[kRows * kStrip];
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    Dequant<ST>(q, s, w.group, k0, kc, scratch);
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const int64_t rows = std::min(kRows, m - r0);
      kBlocks[rows - 1](xp + (r0 / kRows) * K * kRows + k0 * kRows, scratch, part, kc, kStrip, 0,
                        nullptr, 1, false);
      float* t = tile + r0 * kStrip;
      for (int64_t i = 0; i < rows * kStrip; i += kWidth) {
        const Vec v = simd::Load(part + i);
        simd::Store(t + i, k0 == 0 ? v : simd::Add(simd::Load(t + i), v));
      }
    }
  }
}

// tile [M][kStrip] = q8(x) [M, K] @ panel p of the 4-bit w: kDotK rows of k at a time, in
// which kDotRows rows of x at a time.
void Panel4(const QProj& w, int64_t p, const Inputs& in, int64_t m, int64_t K, float* tile) {
  const int64_t groups = K / w.group;
  const uint8_t* q = static_cast<const uint8_t*>(w.q) + p * K / 2 * kStrip;
  const uint16_t* s = static_cast<const uint16_t*>(w.s) + p * groups * kStrip;
  const uint16_t* mins = w.mins + p * groups * kStrip;
  const QuantRows& x = *in.xq;
  const int64_t G = w.group;
  for (int64_t kb = 0; kb < K; kb += kDotK) {
    const int64_t ke = std::min(K, kb + kDotK);
    int64_t r = 0;
    for (; r + kDotRows <= m; r += kDotRows)
      DotRows<kDotRows>(x, r, q, s, mins, K, kb, ke, G, tile + r * kStrip);
    static_assert(kDotRows == 4, "the tails below");
    if (m - r == 3) DotRows<3>(x, r, q, s, mins, K, kb, ke, G, tile + r * kStrip);
    if (m - r == 2) DotRows<2>(x, r, q, s, mins, K, kb, ke, G, tile + r * kStrip);
    if (m - r == 1) DotRows<1>(x, r, q, s, mins, K, kb, ke, G, tile + r * kStrip);
  }
}

void Panel(const QProj& w, int64_t p, const Inputs& in, int64_t m, int64_t K, float* tile,
           float* scratch) {
  if (w.bits == 4) {
    Panel4(w, p, in, m, K, tile);
  } else if (w.half) {
    Panel8<uint16_t>(w, p, in, m, K, tile, scratch);
  } else {
    Panel8<float>(w, p, in, m, K, tile, scratch);
  }
}

// Every panel of every projection on the pool; glu: projs is (gate, up) of equal n and gate's y
// receives silu(x @ Wg) * (x @ Wu).
void RunQuantized(ffi::ThreadPool& pool, const float* xs, int64_t m, int64_t k,
                  const std::vector<QProj>& projs, bool glu) {
  bool eight = false, four = false;
  for (const QProj& pr : projs) (pr.bits == 8 ? eight : four) = true;
  const std::vector<float> packed = m > 1 && eight ? PackRows(xs, m, k) : std::vector<float>();
  const QuantRows xq = four ? QuantizeRows(xs, m, k) : QuantRows{};
  const Inputs in{xs, packed.data(), &xq};
  const size_t listed = glu ? 1 : projs.size();
  const PanelItems items(projs, listed);
  const int64_t rows = (m + kRows - 1) / kRows * kRows;
  ParallelFor(pool, items.size(), [&](int64_t i, int64_t) {
    thread_local std::vector<float> buf;
    buf.resize(kChunk * kStrip + 2 * rows * kStrip);
    float* scratch = buf.data();
    float* tiles[2] = {scratch + kChunk * kStrip, scratch + kChunk * kStrip + rows * kStrip};
    const auto [j, p] = items.Locate(i);
    const QProj& pr = projs[j];
    for (int w = 0; w < (glu ? 2 : 1); ++w)
      Panel(glu ? projs[w] : pr, p, in, m, k, tiles[w], scratch);
    for (int64_t r = 0; r < m; ++r)
      for (int c = 0; c < kCols; ++c) {
        const int64_t at = r * kStrip + c * kWidth, col = p * kStrip + c * kWidth;
        const Vec g = simd::Load(tiles[0] + at);
        StoreHead(pr.y + r * pr.n + col, glu ? SiluMul(g, simd::Load(tiles[1] + at)) : g,
                  pr.n - col);
      }
  });
}

// A QProj for x [M, K] from buffers q, s, mins (each one layer's, or a stack of them [L, ...]
// of which layer `layer` is used) and result y [M, N] (see the file comment), or an error
// saying what does not fit.
ffi::ErrorOr<QProj> Describe(const ffi::AnyBuffer& q, const ffi::AnyBuffer& s,
                             const ffi::AnyBuffer& mins, int32_t layer, float* y, int64_t m,
                             int64_t k, int64_t ym, int64_t n) {
  const bool eight = q.element_type() == ffi::DataType::S8;
  const bool four = q.element_type() == ffi::DataType::U8;
  const bool half = s.element_type() == ffi::DataType::F16;
  LayerView ql, sl, ml;
  const bool views = ViewLayer(q.dimensions(), eight ? 3 : 4, layer, ql) &&
                     ViewLayer(s.dimensions(), 3, layer, sl) &&
                     (!four || ViewLayer(mins.dimensions(), 3, layer, ml));
  const auto& qd = ql.dims;
  const auto& sd = sl.dims;
  const bool q_ok = views && (eight ? qd[1] == k && qd[2] == kStrip
                                    : k % 8 == 0 && qd[1] == k / 8 && qd[2] == kStrip &&
                                          qd[3] == 4);
  if (!(eight || four) || !q_ok || sd[2] != kStrip || sd[0] != qd[0] ||
      sd[1] < 1 || k % sd[1] || !(half || s.element_type() == ffi::DataType::F32) || ym != m ||
      n > qd[0] * kStrip || n <= (qd[0] - 1) * kStrip) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jaxinfer_qmatmul: expected q int8 [P, K, 48] or uint8 [P, K/8, 48, 4], scales float32 "
        "or float16 [P, K/G, 48] (or stacks [L, ...] holding the layer), y [M, N] with "
        "P = ceil(N / 48) for x [M, K]"));
  }
  const int64_t group = k / sd[1];
  if (four && (group % kBlock || !half || mins.element_type() != ffi::DataType::F16 ||
               ml.dims != sl.dims)) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jaxinfer_qmatmul: 4-bit weights need a group of a multiple of 32, float16 scales and "
        "float16 mins of the scales' shape"));
  }
  const size_t s_bytes = half ? 2 : 4;
  return QProj{static_cast<const char*>(q.untyped_data()) + ql.offset,
               static_cast<const char*>(s.untyped_data()) + sl.offset * s_bytes,
               four ? static_cast<const uint16_t*>(mins.untyped_data()) + ml.offset : nullptr, y,
               n, qd[0], group, eight ? 8 : 4, half};
}

// x [M, K] against J quantized weights, each three buffers (q, scales, mins: an empty buffer
// for 8-bit), each one layer's or a stack [L, ...] of which layer `layer` is used -> J results
// [M, N_j]; glu != 0: J = 2 (gate, up) and one result.
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
                   ffi::RemainingArgs ws, ffi::RemainingRets ys, int64_t glu) {
  const auto xd = x.dimensions();
  const size_t j_count = ws.size() / 3;
  if (xd.size() != 2 || ws.size() % 3 || j_count == 0 ||
      ys.size() != (glu ? 1 : j_count) || (glu && j_count != 2)) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_qmatmul: expected x [M, K], 3 buffers per weight, one result per weight (one "
        "for the GLU pair)");
  }
  std::vector<QProj> projs;
  for (size_t j = 0; j < j_count; ++j) {
    auto q = ws.get<ffi::AnyBuffer>(3 * j);
    auto s = ws.get<ffi::AnyBuffer>(3 * j + 1);
    auto mins = ws.get<ffi::AnyBuffer>(3 * j + 2);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(glu ? 0 : j);
    if (!q.has_value() || !s.has_value() || !mins.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("jaxinfer_qmatmul: unreadable buffers");
    }
    const auto yd = (*y)->dimensions();
    if (yd.size() != 2) return ffi::Error::InvalidArgument("jaxinfer_qmatmul: y must be [M, N]");
    auto pr = Describe(*q, *s, *mins, LayerIndex(layer), (*y)->typed_data(), xd[0], xd[1],
                       yd[0], yd[1]);
    if (pr.has_error()) return pr.error();
    projs.push_back(*pr);
  }
  if (glu && (projs[0].n != projs[1].n || projs[0].panels != projs[1].panels)) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: gate and up differ in shape");
  }
  RunQuantized(pool, x.typed_data(), xd[0], xd[1], projs, glu != 0);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("glu"));
