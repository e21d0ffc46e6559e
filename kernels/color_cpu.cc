// CPU kernel of AugsvcColor: ColorPixel's math (color_math.h) rearranged around the uint8
// levels, branch-free, in GCC vector types as wide as the CPU's registers.
//   - V' depends only on V = max(R, G, B), one of 256 levels: a per-call table of 255 * V'.
//   - S = c / max with c = max - min, and x ** a = 2 ** (a * log2(x)) from two short
//     polynomials, for S' and for the table.
//   - The hue stays in sixths: H6 = (sector + (x - y) / c + 6 * shift) mod 6, and HSV -> RGB is
//     the branch-free form of colorsys's six sectors: channel = V' - V' S' w, where w is a
//     clamped distance of H6 from a centre (see D).
//   - max/min and the "which channel is the max" tests run on the integer levels: x -> x / 255
//     is strictly increasing, so they agree with ColorPixel's float tests.
// Each step is a loop of its own over a block of pixels: the steps' dependency chains are long,
// and short loops let the out-of-order core overlap several vectors of each.
// The output is off from the exact value by < 2e-3 level for exponents up to 16 (the
// polynomials' error, times the exponent), so it differs from ColorPixel's only right at a
// rounding tie; scripts/bench_color_kernel.cc checks all 2^24 colours against a float64 oracle.
#include "color_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// x86-64 builds carry an 8-lane AVX2 kernel, picked at run time where the CPU has it, and a
// 4-lane baseline, itself cloned for x86-64-v2 (SSE4.2) and plain x86-64 (SSE2). None enables
// FMA, and all run the same float operations per lane, so they give identical results.
// scripts/bench_color_kernel.cc checks the baseline with -DAUGSVC_NO_AVX2 (x86-64-v2 here) and,
// adding -DAUGSVC_BASELINE_CLONES=, the plain one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#ifndef AUGSVC_NO_AVX2
#define AUGSVC_AVX2_KERNEL 1
#endif
#ifndef AUGSVC_BASELINE_CLONES
#define AUGSVC_BASELINE_CLONES __attribute__((target_clones("arch=x86-64-v2", "default")))
#endif
#else
#define AUGSVC_BASELINE_CLONES
#endif

namespace augsvc {

namespace {

// Float and int32 vectors of N lanes; IntOf<F> is the int32 vector as wide as F.
template <int N>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * N)));
  typedef int32_t I __attribute__((vector_size(4 * N)));
};
template <class F>
struct IntVector {
  typedef int32_t type __attribute__((vector_size(sizeof(F))));
};
template <class F>
using IntOf = typename IntVector<F>::type;

// Pixels per block (a multiple of the lanes): the block's temporaries (3 KiB) stay in L1.
constexpr int kBlock = 256;

// The fast path's range of the exponents: a * log2(x) stays within Exp2's range, and the
// polynomials' error, times a, stays below 0.005 level. The spec allows (0, 16].
constexpr float kMaxPow = 64.0f;

// Selects and integer min/max as g++ lowers them (blends, pmaxsd). A float `a > b ? a : b`
// becomes a compare and a blend rather than maxps, so float clamps use ClampNonNegative.
template <class I, class F>
inline F Select(I mask, F a, F b) {
  return mask ? a : b;
}
template <class I>
inline I Max(I a, I b) {
  return a > b ? a : b;
}
template <class I>
inline I Min(I a, I b) {
  return a < b ? a : b;
}
template <class F>
inline IntOf<F> Bits(F x) {
  return reinterpret_cast<IntOf<F>>(x);
}
template <class F>
inline F Abs(F x) {
  return reinterpret_cast<F>(Bits(x) & 0x7fffffff);
}

// clamp(x, lo, hi) for 0 <= lo <= hi and any x but NaN, with integer min/max: non-negative
// floats order as their bit patterns do, and a negative x has a negative bit pattern.
template <class F>
inline F ClampNonNegative(F x, float lo, float hi) {
  return reinterpret_cast<F>(Min(Max(Bits(x), Bits(F{} + lo)), Bits(F{} + hi)));
}

// 1.5 * 2^23: adding it to |x| < 2^22 leaves no fraction bits (the FPU rounds half to even),
// and the low mantissa bits then hold round(x) in two's complement.
constexpr float kRound = 12582912.0f;

// log2(x) for normal x > 0 (callers mask out x = 0). Absolute error < 2e-7.
template <class F>
inline F Log2(F x) {
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)), from the bits alone
  const IntOf<F> bits = Bits(x);
  const IntOf<F> e = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3 = sqrt(1/2)
  const F m = reinterpret_cast<F>(bits - (e << 23));
  // log2(m) = 2 atanh(t) / ln 2, t = (m - 1) / (m + 1), |t| < 0.172: odd minimax polynomial
  const F t = (m - 1.0f) / (m + 1.0f);
  const F t2 = t * t;
  const F p = t * (2.88539124f + t2 * (0.961470902f + t2 * 0.598971546f));
  return __builtin_convertvector(e, F) + p;
}

// 2^y for -2^22 < y <= 0: 0 below ~2^-126.5 (no subnormals). Relative error < 3e-7.
template <class F>
inline F Exp2(F y) {
  const F big = y + kRound;
  const F f = y - (big - kRound);  // y - round(y), in [-0.5, 0.5]
  // minimax polynomial, evaluated as (c0 + c1 f) + f^2 ((c2 + c3 f) + f^2 (c4 + c5 f))
  const F f2 = f * f;
  const F p45 = 0.00967554189f + f * 0.00132764713f;
  const F p23 = 0.240221202f + f * 0.0555071309f;
  const F p01 = 1.00000012f + f * 0.693146944f;
  const F p = p01 + f2 * (p23 + f2 * p45);
  // 2^round(y) from the exponent bits; round(y) <= -127 gives 0
  const IntOf<F> biased = Max(Bits(big) - Bits(F{} + kRound) + 127, IntOf<F>{});
  return p * reinterpret_cast<F>(biased << 23);
}

// PowScaleShift(x, a, m, d) = clip(x ** a * m + d, 0, 1) for 0 <= x <= 1 and
// 0 < a <= kMaxPow, in two steps (two loops, see above): y = a * log2(x), with y = -2^21 for
// x = 0 (0 ** a = 0), then clip(2 ** y * m + d, 0, 1).
template <class F>
inline F PowExponent(F x, float a) {
  return Select(x > 0.0f, a * Log2(x), F{} - 2097152.0f);
}
template <class F>
inline F ScaleShift(F y, float m, float d) {
  return ClampNonNegative(Exp2(y) * m + d, 0.0f, 1.0f);
}

// clamp(|h6 - centre|, 1, 2). For a hue h6 in [0, 6], colorsys's six sectors give channel
// values V' - V' S' w with w_R = 2 - D(3), w_G = D(2) - 1 and w_B = D(4) - 1.
template <class F>
inline F D(F h6, float centre) {
  return ClampNonNegative(Abs(h6 - centre), 1.0f, 2.0f);
}

// round-half-even(x) clipped to [0, 255] (ColorPixel's rintf + clip: 0 and 255 are integers,
// so clipping first is the same), for |x| < 2^22, as the bits of x + kRound: the level is in
// the low byte, bytes 1 and 2 hold 0x00 and 0x40.
template <class F>
inline IntOf<F> ToLevel(F x) {
  return Min(Max(Bits(x + kRound), Bits(F{} + kRound)), Bits(F{} + (kRound + 255.0f)));
}

// Loading and storing N interleaved RGB pixels as one int32 lane per pixel and channel. With
// 8 lanes (AVX2), the 24 bytes are read as two 16-byte halves, src[0, 16) and src[8, 24):
// pixels 0-3 at bytes 0-11 of the first, pixels 4-7 at bytes 4-15 of the second, so that each
// channel is one byte shuffle within the halves of one register. Narrower (SSE) builds move
// bytes one by one: g++ lowers vector byte shuffles there to that anyway, or worse.
template <int N>
inline void Load(const uint8_t *src, typename Lanes<N>::I &r, typename Lanes<N>::I &g,
                 typename Lanes<N>::I &b) {
  if constexpr (N == 8) {
    typedef uint8_t U8x16 __attribute__((vector_size(16)));
    U8x16 lo, hi;
    std::memcpy(&lo, src, sizeof lo);
    std::memcpy(&hi, src + 8, sizeof hi);
    const auto x = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                           14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                           27, 28, 29, 30, 31);
    // (the don't-care bytes, cleared by the mask, come from the same half too)
#define AUGSVC_CHANNEL(o)                                                                     \
  (reinterpret_cast<typename Lanes<N>::I>(__builtin_shufflevector(                            \
       x, x, o, o, o, o, o + 3, o, o, o, o + 6, o, o, o, o + 9, o, o, o, o + 20, o + 20, o + 20, \
       o + 20, o + 23, o + 20, o + 20, o + 20, o + 26, o + 20, o + 20, o + 20, o + 29, o + 20,   \
       o + 20, o + 20)) &                                                                     \
   0xff)
    r = AUGSVC_CHANNEL(0);
    g = AUGSVC_CHANNEL(1);
    b = AUGSVC_CHANNEL(2);
#undef AUGSVC_CHANNEL
  } else {
    for (int k = 0; k < N; k++) {
      r[k] = src[3 * k];
      g[k] = src[3 * k + 1];
      b[k] = src[3 * k + 2];
    }
  }
}

// Stores N pixels at dst from ToLevel's R, G and B.
template <int N>
inline void Store(uint8_t *dst, typename Lanes<N>::I r, typename Lanes<N>::I g,
                  typename Lanes<N>::I b) {
  if constexpr (N == 8) {
    // R | G << 8 | B << 16 in bytes 0-2 of each lane (R's byte 2 cleared first), those bytes
    // packed at the start of each 16-byte half (12 bytes each), then the halves made contiguous
    typedef uint8_t U8x32 __attribute__((vector_size(32)));
    typedef uint64_t U64x4 __attribute__((vector_size(32)));
    const auto x = reinterpret_cast<U8x32>((r & 0xffff) | (g << 8) | (b << 16));
    const auto p = reinterpret_cast<typename Lanes<8>::I>(__builtin_shufflevector(
        x, x, 0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 0, 0, 0, 0, 16, 17, 18, 20, 21, 22, 24, 25,
        26, 28, 29, 30, 16, 16, 16, 16));
    const auto out = __builtin_shufflevector(p, p, 0, 1, 2, 4, 5, 6, 3, 7);
    // 16 + 8 bytes from registers (a 24-byte memcpy of the vector goes through the stack)
    const auto first = __builtin_shufflevector(out, out, 0, 1, 2, 3);
    const uint64_t last = reinterpret_cast<U64x4>(out)[2];
    std::memcpy(dst, &first, sizeof first);
    std::memcpy(dst + 16, &last, sizeof last);
  } else {
    for (int k = 0; k < N; k++) {
      dst[3 * k] = static_cast<uint8_t>(r[k]);
      dst[3 * k + 1] = static_cast<uint8_t>(g[k]);
      dst[3 * k + 2] = static_cast<uint8_t>(b[k]);
    }
  }
}

// The vectorised kernel, N lanes, for 0 < sat_pow, val_pow <= kMaxPow.
template <int N>
__attribute__((always_inline)) inline void Run(const uint8_t *in, uint8_t *out, int64_t npix,
                                               const ColorParams &p) {
  using F = typename Lanes<N>::F;
  using I = typename Lanes<N>::I;
  constexpr int kVectors = kBlock / N;
  I iota;
  for (int k = 0; k < N; k++)
    iota[k] = k;

  F vlut[256 / N];  // 255 * V' for V = level / 255
  for (int j = 0; j < 256 / N; j++)
    vlut[j] = PowExponent(__builtin_convertvector(iota + N * j, F) / 255.0f, p.val_pow);
  for (F &v : vlut)
    v = 255.0f * ScaleShift(v, p.val_scale, p.val_shift);
  const float *const vtab = reinterpret_cast<const float *>(vlut);
  // 6 * (shift mod 1), in [0, 6)
  double shift6 = 6.0 * (static_cast<double>(p.hue_shift) - std::floor(p.hue_shift));
  shift6 = shift6 < 6.0 ? shift6 : 0.0;
  const float hue_shift6 = static_cast<float>(shift6);
  // Any offset beyond +-256 levels saturates every output as +-256 does; the limit keeps
  // ToLevel's argument small.
  const float off_r = std::clamp(p.offset[0], -256.0f, 256.0f);
  const float off_g = std::clamp(p.offset[1], -256.0f, 256.0f);
  const float off_b = std::clamp(p.offset[2], -256.0f, 256.0f);

  F val[kVectors], sat[kVectors], hue6[kVectors];
  alignas(32) uint8_t tail[3 * kBlock];  // the last, partial block, padded to whole vectors
  for (int64_t start = 0; start < npix; start += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, npix - start));
    const int nvec = (n + N - 1) / N;
    const uint8_t *src = in + 3 * start;
    uint8_t *dst = out + 3 * start;
    if (n % N != 0) {
      std::memcpy(tail, src, 3 * n);
      std::memset(tail + 3 * n, 0, 3 * (nvec * N - n));
      src = dst = tail;
    }

    // colorsys.rgb_to_hsv: V' from the table, S, and H in sixths plus the shift, mod 6
    for (int j = 0; j < nvec; j++) {
      I r, g, b;
      Load<N>(src + 3 * N * j, r, g, b);
      const I vmax = Max(r, Max(g, b));
      const I c = vmax - Min(r, Min(g, b));
      for (int k = 0; k < N; k++)  // (unsigned: no sign extension of the index)
        val[j][k] = vtab[static_cast<uint32_t>(vmax[k])];
      // black (max = 0) has c = 0: S = 0 / 1 = 0, as colorsys
      sat[j] = __builtin_convertvector(c, F) / __builtin_convertvector(Max(vmax, I{} + 1), F);
      // H6 = sector + (x - y) / c in [0, 6], where colorsys's negative H (R the max, G < B)
      // takes sector 6 instead of 0; greys (c = 0) have x - y = 0 and sector 0: H = 0
      const I rmax = r == vmax, gmax = g == vmax;
      const I diff = rmax ? g - b : (gmax ? b - r : r - g);
      const F sector = Select(rmax, Select(g < b, F{} + 6.0f, F{}),
                              Select(gmax, F{} + 2.0f, F{} + 4.0f));
      const F h6 = (sector + hue_shift6) +
                   __builtin_convertvector(diff, F) / __builtin_convertvector(Max(c, I{} + 1), F);
      hue6[j] = Select(h6 >= 6.0f, h6 - 6.0f, h6);
    }

    // S' = clip(S ** a * m + d, 0, 1)
    for (int j = 0; j < nvec; j++)
      sat[j] = PowExponent(sat[j], p.sat_pow);
    for (int j = 0; j < nvec; j++)
      sat[j] = ScaleShift(sat[j], p.sat_scale, p.sat_shift);

    // colorsys.hsv_to_rgb, + offset, round, saturate
    for (int j = 0; j < nvec; j++) {
      const F v = val[j], vs = v * sat[j], h6 = hue6[j];
      const F vpvs = v + vs;
      const I r = ToLevel(((v - vs) - vs + off_r) + vs * D(h6, 3.0f));
      const I g = ToLevel((vpvs + off_g) - vs * D(h6, 2.0f));
      const I b = ToLevel((vpvs + off_b) - vs * D(h6, 4.0f));
      Store<N>(dst + 3 * N * j, r, g, b);
    }

    if (dst == tail)
      std::memcpy(out + 3 * start, tail, 3 * n);
  }
}

#ifdef AUGSVC_AVX2_KERNEL
__attribute__((target("avx2"))) void RunAvx2(const uint8_t *in, uint8_t *out, int64_t npix,
                                             const ColorParams &p) {
  Run<8>(in, out, npix, p);
}
#endif

AUGSVC_BASELINE_CLONES
void RunBaseline(const uint8_t *in, uint8_t *out, int64_t npix, const ColorParams &p) {
  Run<4>(in, out, npix, p);
}

}  // namespace

void ColorPixelsCpu(const uint8_t *in, uint8_t *out, int64_t npix, const ColorParams &p) {
  if (!(p.sat_pow > 0.0f && p.sat_pow <= kMaxPow && p.val_pow > 0.0f && p.val_pow <= kMaxPow)) {
    for (int64_t k = 0; k < npix; k++)  // outside the fast path's range: per pixel, exactly
      ColorPixel(in + 3 * k, out + 3 * k, p);
    return;
  }
#ifdef AUGSVC_AVX2_KERNEL
  if (__builtin_cpu_supports("avx2"))
    return RunAvx2(in, out, npix, p);
#endif
  RunBaseline(in, out, npix, p);
}

}  // namespace augsvc
