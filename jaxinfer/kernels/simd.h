// The instruction-set layer of the kernels (cpu.cc, quant.cc): one float vector type and the few operations the
// kernels use, for the instruction set the library is compiled for (the compiler flags choose:
// jaxinfer.kernels builds one library per ISA). Everything ISA-specific lives here; a new
// instruction set (say aarch64 NEON: kWidth 4, kRegs 32) is one more section.
//
//   Vec            kWidth float32 lanes          Mask   one bit (or lane) per lane of a Vec
//   kRegs          vector registers the compiler can keep values in (sets register blocking)
//   kAheadL1 kAheadL2  panel rows a matmul prefetches ahead (0: none, the hardware prefetchers
//                  alone), tuned on the machines docs/BENCHMARKS.md names for each ISA
//   Zero Set1 Load Store           plain vector moves (unaligned)
//   LoadMasked StoreMasked         lanes where the mask is set (others read as 0 / untouched);
//                                  never touch memory of the other lanes
//   Head(n)                        mask of lanes i < n (n may be <= 0 or >= kWidth)
//   Add Sub Mul Div Min Max        lane-wise; Fma(a, b, c) = a * b + c, Fnma(a, b, c) = c - a * b
//   RoundNearest(x)                to the nearest integer (ties to even), as float
//   Ldexp(p, n)                    p * 2^n for integral n in [-126, 128]
//   ReduceAdd ReduceMax            horizontal, to one float
//   Select(m, a, b)                m ? a : b per lane; And(m1, m2), Any(m)
//   NotEqual(a, b)                 lanes where a != b (ordered)
//   Visible(in, pos, qpos, window) lanes of `in` whose int32 pos[i] satisfies
//                                  0 <= pos <= qpos and qpos - pos < window (pos read under in)
//   InRegister(v)                  compiler hint: keep v in a register here (not re-read from
//                                  memory by each instruction that uses it)
//   LoadI8(p)                      kWidth int8 values at p, as floats
//   LoadHalf(p)                    kWidth float16 values (uint16 bits) at p, as floats (F16C)
//   IVec                           kWidth int32 lanes (4 bytes each for the byte operations)
//   IZero LoadBytes(p)             zeros; 4 * kWidth bytes at p
//   Quad(p)                        the 4 int8 at p, in every 32-bit lane
//   LowNibbles HighNibbles(b)      each byte's low / high nibble (0..15), as bytes
//   DotPairs(acc, u0, s0, u1, s1)  acc + per 16-bit lane the sum of its 4 products u * s of
//                                  unsigned bytes u0, u1 (< 16) with signed bytes s0, s1
//                                  (|s| <= 127), in int16 lanes: |sum| <= 7620, so four
//                                  calls add up without overflow (with VNNI: per 32-bit lane,
//                                  its 8 products)
//   SumPairs(p)                    per 32-bit lane the sum of its two int16 lanes of p (with
//                                  VNNI: p itself); either way, after up to four DotPairs,
//                                  per 32-bit lane the sum of the products of its 4 bytes
//   ToFloat(i)                     int32 lanes as floats
//   StoreI8(p, v)                  v's lanes (integers in [-127, 127], as floats) as kWidth int8 at p
//   PrefetchL1 PrefetchL2 Pause    hints
#ifndef JAXINFER_KERNELS_SIMD_H_
#define JAXINFER_KERNELS_SIMD_H_

#include <immintrin.h>

#include <cstdint>

namespace simd {
namespace {  // internal linkage: the libraries of two ISAs never share a symbol

#if defined(__AVX512F__)

#if defined(__AVX512VNNI__)
constexpr char kIsa[] = "avx512vnni";  // AVX-512 whose DotPairs is VNNI's vpdpbusd
#else
constexpr char kIsa[] = "avx512";
#endif
constexpr int kWidth = 16;
constexpr int kRegs = 32;
constexpr int kAheadL1 = 16, kAheadL2 = 128;  // Zen 4: more bytes in flight, faster streaming
using Vec = __m512;
using Mask = __mmask16;

inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Set1(float a) { return _mm512_set1_ps(a); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec LoadMasked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void StoreMasked(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
inline Mask Head(int64_t n) {
  return n >= kWidth ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1);
}
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec Sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec Div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec Min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec Max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Fnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
inline Vec RoundNearest(Vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Vec Ldexp(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
inline float ReduceAdd(Vec v) { return _mm512_reduce_add_ps(v); }
inline float ReduceMax(Vec v) { return _mm512_reduce_max_ps(v); }
inline Vec Select(Mask m, Vec a, Vec b) { return _mm512_mask_blend_ps(m, b, a); }
inline Mask And(Mask a, Mask b) { return a & b; }
inline bool Any(Mask m) { return m != 0; }
inline Mask NotEqual(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
// With 32 registers GCC keeps a matmul's weight vectors in registers by itself.
inline void InRegister(Vec&) {}
inline Mask Visible(Mask in, const int32_t* pos, int32_t qpos, int32_t window) {
  const __m512i p = _mm512_maskz_loadu_epi32(in, pos), qp = _mm512_set1_epi32(qpos);
  return in & _mm512_cmpge_epi32_mask(p, _mm512_setzero_si512()) & _mm512_cmple_epi32_mask(p, qp) &
         _mm512_cmplt_epi32_mask(_mm512_sub_epi32(qp, p), _mm512_set1_epi32(window));
}

inline Vec LoadI8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec LoadHalf(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

using IVec = __m512i;
inline IVec IZero() { return _mm512_setzero_si512(); }
inline IVec LoadBytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline IVec Quad(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline IVec LowNibbles(IVec b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
inline IVec HighNibbles(IVec b) {
  return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15));
}
#if defined(__AVX512VNNI__)
// The pairs are summed into int32 lanes at once: SumPairs has nothing left to do, and the
// sums are the same integers.
inline IVec DotPairs(IVec acc, IVec u0, IVec s0, IVec u1, IVec s1) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, u0, s0), u1, s1);
}
inline IVec SumPairs(IVec p) { return p; }
#else
inline IVec DotPairs(IVec acc, IVec u0, IVec s0, IVec u1, IVec s1) {  // AVX512BW
  return _mm512_add_epi16(acc, _mm512_add_epi16(_mm512_maddubs_epi16(u0, s0),
                                                _mm512_maddubs_epi16(u1, s1)));
}
inline IVec SumPairs(IVec p) { return _mm512_madd_epi16(p, _mm512_set1_epi16(1)); }
#endif
inline Vec ToFloat(IVec i) { return _mm512_cvtepi32_ps(i); }
inline void StoreI8(int8_t* p, Vec v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr char kIsa[] = "avx2";
constexpr int kWidth = 8;
constexpr int kRegs = 16;
constexpr int kAheadL1 = 0, kAheadL2 = 0;  // Zen 3: batch-1 streams faster without them
using Vec = __m256;
using Mask = __m256;  // all ones in the lanes that are set

inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Set1(float a) { return _mm256_set1_ps(a); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline __m256i Bits(Mask m) { return _mm256_castps_si256(m); }
inline Vec LoadMasked(const float* p, Mask m) { return _mm256_maskload_ps(p, Bits(m)); }
inline void StoreMasked(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, Bits(m), v); }
inline Mask Head(int64_t n) {
  const int32_t c = n >= kWidth ? kWidth : n <= 0 ? 0 : static_cast<int32_t>(n);
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec Sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec Div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec Min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec Max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Fnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vec RoundNearest(Vec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// 2^n as two factors 2^h * 2^(n - h), h = n / 2: each exponent stays normal for n = 128 and -126.
inline Vec Pow2(__m256i e) {  // 2^e for integral e in [-126, 127], built from its exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}
inline Vec Ldexp(Vec p, Vec n) {
  const __m256i e = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(e, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, Pow2(h)), Pow2(_mm256_sub_epi32(e, h)));
}
inline float ReduceAdd(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float ReduceMax(Vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vec Select(Mask m, Vec a, Vec b) { return _mm256_blendv_ps(b, a, m); }
inline Mask And(Mask a, Mask b) { return _mm256_and_ps(a, b); }
inline bool Any(Mask m) { return _mm256_movemask_ps(m) != 0; }
inline Mask NotEqual(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
// With 16 registers GCC folds a matmul's weight loads into every FMA instead (one load per row
// and vector, load-bound: 62 vs 82 GFLOP/s for 4 rows x 24 columns on one Zen 3 core).
inline void InRegister(Vec& v) { asm("" : "+x"(v)); }
inline Mask Visible(Mask in, const int32_t* pos, int32_t qpos, int32_t window) {
  const __m256i p = _mm256_maskload_epi32(pos, Bits(in)), qp = _mm256_set1_epi32(qpos);
  const __m256i nonneg = _mm256_cmpgt_epi32(p, _mm256_set1_epi32(-1));
  const __m256i after = _mm256_cmpgt_epi32(p, qp);  // p > qpos: not visible
  const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(window), _mm256_sub_epi32(qp, p));
  const __m256i vis = _mm256_andnot_si256(after, _mm256_and_si256(nonneg, inside));
  return _mm256_and_ps(in, _mm256_castsi256_ps(vis));
}

inline Vec LoadI8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec LoadHalf(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

using IVec = __m256i;
inline IVec IZero() { return _mm256_setzero_si256(); }
inline IVec LoadBytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec Quad(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline IVec LowNibbles(IVec b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
inline IVec HighNibbles(IVec b) {
  return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15));
}
inline IVec DotPairs(IVec acc, IVec u0, IVec s0, IVec u1, IVec s1) {
  return _mm256_add_epi16(_mm256_add_epi16(acc, _mm256_maddubs_epi16(u0, s0)),
                          _mm256_maddubs_epi16(u1, s1));
}
inline IVec SumPairs(IVec p) { return _mm256_madd_epi16(p, _mm256_set1_epi16(1)); }
inline Vec ToFloat(IVec i) { return _mm256_cvtepi32_ps(i); }
inline void StoreI8(int8_t* p, Vec v) {
  const __m256i i = _mm256_cvtps_epi32(v);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}

#else
#error "jaxinfer's kernels need AVX-512F, or AVX2 and FMA (-mavx512f, or -mavx2 -mfma)"
#endif

// x86 hints, shared by both sections above.
inline void PrefetchL1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline void PrefetchL2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
inline void Pause() { _mm_pause(); }

}  // namespace
}  // namespace simd

#endif  // JAXINFER_KERNELS_SIMD_H_
