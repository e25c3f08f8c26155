// Matmuls against quantized weights kept in panels (XLA FFI calls), for every quantized format
// jaxinfer has (int8 per channel, int4 group-wise, GGUF Q8_0 / Q4_0 / Q4_1): jaxinfer.kernels
// repacks each into one of two panel layouts at load.
//
// A weight W [K, N] is panels like the float32 weights (panel p: columns p*S .. p*S+S-1, zero
// padded past N; S = kStrip = 48), in groups of G rows of k that share a scale per column:
//   8-bit: q int8 [P, K, S];                    W[k, c] = q[k, c] * scale[k / G, c]
//   4-bit: q uint8 [P, K / 2, S], byte (j, c) holds rows 2j (low nibble) and 2j + 1 (high),
//          values 0..15;                        W[k, c] = q[k, c] * scale[k / G, c] + min[k / G, c]
// scales [P, K / G, S] float32 or float16, mins [P, K / G, S] float16 (4-bit only; a
// symmetric format has min = -8 * scale). Activations stay float32: no quantized activations.
//
// One row of x (a decode step at batch 1, memory bound): each group's dot with the integers is
// summed in registers and scaled once per group (x's group sum times the mins added), so the
// inner loop is convert + FMA per vector of weights and the weights are read once, packed. More
// rows: a chunk of the panel is dequantized into a float32 scratch in L1/L2 once, and the float32
// register-blocked matmul of common.h runs over it for every block of rows.
#include "common.h"

namespace {

constexpr int64_t kChunk = 128;  // rows of k dequantized at a time for several rows of x

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

// Vectors of columns per pass for one row: the most (a divisor of kCols) whose C accumulators,
// C group sums, two broadcasts and two weight vectors fit in the registers (AVX2 6, AVX-512 3:
// the whole panel row in one pass; measured on Zen 3, two passes of 3 were ~20% slower, and two
// chains of partial sums per vector made no difference: conversions bound the loop, not FMA
// latency).
constexpr int RowCols() {
  for (int c = kCols; c > 1; --c)
    if (kCols % c == 0 && 2 * c + 4 <= simd::kRegs) return c;
  return 1;
}

// tile[C0 * kWidth .. (C0 + C) * kWidth) = x [K] @ the panel's columns there; q, s, mins point
// at the panel (see the file comment).
template <int Bits, typename ST, int C, int C0>
void RowCols(const float* x, const void* q, const ST* s, const uint16_t* mins, int64_t K,
             int64_t G, float* tile) {
  Vec acc[C];
  for (int c = 0; c < C; ++c) acc[c] = simd::Zero();
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    Vec part[C];  // sum over the group of x * q
    for (int c = 0; c < C; ++c) part[c] = simd::Zero();
    if constexpr (Bits == 8) {
      const int8_t* qk = static_cast<const int8_t*>(q) + g0 * kStrip + C0 * kWidth;
      for (int64_t k = g0; k < g0 + G; ++k, qk += kStrip) {
        const Vec xb = simd::Set1(x[k]);
        for (int c = 0; c < C; ++c) part[c] = simd::Fma(xb, simd::LoadI8(qk + c * kWidth), part[c]);
      }
    } else {
      const uint8_t* qk = static_cast<const uint8_t*>(q) + g0 / 2 * kStrip + C0 * kWidth;
      for (int64_t k = g0; k < g0 + G; k += 2, qk += kStrip) {
        const Vec x0 = simd::Set1(x[k]), x1 = simd::Set1(x[k + 1]);
        for (int c = 0; c < C; ++c) {
          Vec lo, hi;
          simd::Nibbles(qk + c * kWidth, lo, hi);
          part[c] = simd::Fma(x1, hi, simd::Fma(x0, lo, part[c]));
        }
      }
    }
    const ST* sg = s + g * kStrip + C0 * kWidth;
    for (int c = 0; c < C; ++c) acc[c] = simd::Fma(part[c], LoadScale(sg + c * kWidth), acc[c]);
    if constexpr (Bits == 4) {  // + (sum of x over the group) * min
      float sum = 0.0f;
      for (int64_t k = g0; k < g0 + G; ++k) sum += x[k];
      const Vec xs = simd::Set1(sum);
      const uint16_t* mg = mins + g * kStrip + C0 * kWidth;
      for (int c = 0; c < C; ++c) acc[c] = simd::Fma(xs, simd::LoadHalf(mg + c * kWidth), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) simd::Store(tile + (C0 + c) * kWidth, acc[c]);
}

template <int Bits, typename ST, int C0 = 0>
void Row(const float* x, const void* q, const ST* s, const uint16_t* mins, int64_t K, int64_t G,
         float* tile) {
  constexpr int C = RowCols();
  RowCols<Bits, ST, C, C0>(x, q, s, mins, K, G, tile);
  if constexpr (C0 + C < kCols) Row<Bits, ST, C0 + C>(x, q, s, mins, K, G, tile);
}

// out [kc][kStrip] = W rows k0 .. k0 + kc of the panel, as float32 (k0 and kc even for 4-bit).
template <int Bits, typename ST>
void Dequant(const void* q, const ST* s, const uint16_t* mins, int64_t G, int64_t k0,
             int64_t kc, float* out) {
  for (int64_t k = k0; k < k0 + kc; k += Bits == 8 ? 1 : 2) {
    const ST* sg = s + k / G * kStrip;
    const uint16_t* mg = Bits == 4 ? mins + k / G * kStrip : nullptr;
    float* o = out + (k - k0) * kStrip;
    for (int c = 0; c < kCols; ++c) {
      const Vec sc = LoadScale(sg + c * kWidth);
      if constexpr (Bits == 8) {
        const int8_t* qk = static_cast<const int8_t*>(q) + k * kStrip;
        simd::Store(o + c * kWidth, simd::Mul(simd::LoadI8(qk + c * kWidth), sc));
      } else {
        const uint8_t* qk = static_cast<const uint8_t*>(q) + k / 2 * kStrip;
        const Vec mn = simd::LoadHalf(mg + c * kWidth);
        Vec lo, hi;
        simd::Nibbles(qk + c * kWidth, lo, hi);
        simd::Store(o + c * kWidth, simd::Fma(lo, sc, mn));
        simd::Store(o + kStrip + c * kWidth, simd::Fma(hi, sc, mn));
      }
    }
  }
}

// tile [M][kStrip] = x [M, K] @ panel p of w. x is given row-major (xs, for one row) and packed
// for the register blocks (xp, for several); scratch holds kChunk * kStrip floats.
template <int Bits, typename ST>
void PanelT(const QProj& w, int64_t p, const float* xs, const float* xp, int64_t m, int64_t K,
            float* tile, float* scratch) {
  const int64_t groups = K / w.group;
  const void* q = static_cast<const int8_t*>(w.q) + p * (Bits == 8 ? K : K / 2) * kStrip;
  const ST* s = static_cast<const ST*>(w.s) + p * groups * kStrip;
  const uint16_t* mins = Bits == 4 ? w.mins + p * groups * kStrip : nullptr;
  if (m == 1) {
    Row<Bits, ST>(xs, q, s, mins, K, w.group, tile);
    return;
  }
  alignas(64) float part[kRows * kStrip];
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    Dequant<Bits, ST>(q, s, mins, w.group, k0, kc, scratch);
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const int64_t rows = std::min(kRows, m - r0);
      kBlocks[rows - 1](xp + (r0 / kRows) * K * kRows + k0 * kRows, scratch, part, kc, kStrip, 0,
                        nullptr, 1);
      float* t = tile + r0 * kStrip;
      for (int64_t i = 0; i < rows * kStrip; i += kWidth) {
        const Vec v = simd::Load(part + i);
        simd::Store(t + i, k0 == 0 ? v : simd::Add(simd::Load(t + i), v));
      }
    }
  }
}

void Panel(const QProj& w, int64_t p, const float* xs, const float* xp, int64_t m, int64_t K,
           float* tile, float* scratch) {
  if (w.bits == 8 && !w.half) {
    PanelT<8, float>(w, p, xs, xp, m, K, tile, scratch);
  } else if (w.bits == 8) {
    PanelT<8, uint16_t>(w, p, xs, xp, m, K, tile, scratch);
  } else {
    PanelT<4, uint16_t>(w, p, xs, xp, m, K, tile, scratch);
  }
}

// Every panel of every projection on the pool; glu: projs is (gate, up) of equal n and gate's y
// receives silu(x @ Wg) * (x @ Wu).
void RunQuantized(ffi::ThreadPool& pool, const float* xs, int64_t m, int64_t k,
                  const std::vector<QProj>& projs, bool glu) {
  const std::vector<float> packed = m > 1 ? PackRows(xs, m, k) : std::vector<float>();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const size_t listed = glu ? 1 : projs.size();
  int64_t total = 0;
  for (size_t j = 0; j < listed; ++j) total += projs[j].panels;
  const int64_t chunk = std::max<int64_t>(1, total / (2 * threads));
  std::vector<std::pair<int64_t, int64_t>> items;  // (projection, first panel)
  for (size_t j = 0; j < listed; ++j)
    for (int64_t p = 0; p < projs[j].panels; p += chunk) items.emplace_back(j, p);
  const int64_t rows = (m + kRows - 1) / kRows * kRows;
  ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local std::vector<float> buf;
    buf.resize(kChunk * kStrip + 2 * rows * kStrip);
    float* scratch = buf.data();
    float* tiles[2] = {scratch + kChunk * kStrip, scratch + kChunk * kStrip + rows * kStrip};
    const QProj& pr = projs[items[i].first];
    const int64_t pend = std::min(pr.panels, items[i].second + chunk);
    for (int64_t p = items[i].second; p < pend; ++p) {
      for (int j = 0; j < (glu ? 2 : 1); ++j)
        Panel(glu ? projs[j] : pr, p, xs, packed.data(), m, k, tiles[j], scratch);
      for (int64_t r = 0; r < m; ++r)
        for (int c = 0; c < kCols; ++c) {
          const int64_t at = r * kStrip + c * kWidth, col = p * kStrip + c * kWidth;
          const Vec g = simd::Load(tiles[0] + at);
          StoreHead(pr.y + r * pr.n + col, glu ? SiluMul(g, simd::Load(tiles[1] + at)) : g,
                    pr.n - col);
        }
    }
  });
}

// A QProj for x [M, K] from buffers q, s, mins and result y [M, N] (see the file comment), or
// an error saying what does not fit.
ffi::ErrorOr<QProj> Describe(const ffi::AnyBuffer& q, const ffi::AnyBuffer& s,
                             const ffi::AnyBuffer& mins, float* y, int64_t m, int64_t k,
                             int64_t ym, int64_t n) {
  const auto qd = q.dimensions(), sd = s.dimensions();
  const bool eight = q.element_type() == ffi::DataType::S8;
  const bool four = q.element_type() == ffi::DataType::U8;
  const bool half = s.element_type() == ffi::DataType::F16;
  if (qd.size() != 3 || sd.size() != 3 || qd[2] != kStrip || sd[2] != kStrip || sd[0] != qd[0] ||
      !(eight || four) || qd[1] != (eight ? k : k / 2) || (four && k % 2) || sd[1] < 1 ||
      k % sd[1] || !(half || s.element_type() == ffi::DataType::F32) || ym != m ||
      n > qd[0] * kStrip || n <= (qd[0] - 1) * kStrip) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jaxinfer_qmatmul: expected q int8 [P, K, 48] or uint8 [P, K/2, 48], scales float32 or "
        "float16 [P, K/G, 48], y [M, N] with P = ceil(N / 48) for x [M, K]"));
  }
  const int64_t group = k / sd[1];
  if (four && (group % 2 || !half || mins.element_type() != ffi::DataType::F16 ||
               mins.element_count() != s.element_count())) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jaxinfer_qmatmul: 4-bit weights need an even group, float16 scales and float16 mins "
        "of the scales' shape"));
  }
  return QProj{q.untyped_data(), s.untyped_data(),
               four ? static_cast<const uint16_t*>(mins.untyped_data()) : nullptr, y, n, qd[0],
               group, eight ? 8 : 4, half};
}

// x [M, K] against J quantized weights, each three buffers (q, scales, mins: an empty buffer
// for 8-bit) -> J results [M, N_j]; glu != 0: J = 2 (gate, up) and one result.
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                   ffi::RemainingRets ys, int64_t glu) {
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
    auto pr = Describe(*q, *s, *mins, (*y)->typed_data(), xd[0], xd[1], yd[0], yd[1]);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("glu"));
