// CPU kernel of AugsvcColor, written for g++'s auto-vectoriser: the math of ColorPixel
// (color_math.h) without branches, over blocks of pixels held in small float arrays.
//   - V' depends only on V = max(R, G, B), one of 256 levels: a per-call table, filled by
//     PowScaleShift itself, so V' is bit-identical to ColorPixel's.
//   - S' takes pow(S, a) = exp2(a * log2(S)) from the polynomials below (~1e-6 relative).
//   - max/min and the "which channel is the max" tests run on the uint8 levels: x -> x / 255
//     is strictly increasing, so they agree with ColorPixel's float tests.
// Everything else is ColorPixel's float expressions in the same order, so the output matches
// it except where S' differs by an ulp-sized amount right at a rounding tie.
// Needs -fno-trapping-math (augsvc/kernels.py passes it): without it g++ keeps the ?: below as
// branches and vectorises none of the loops. Check with -fopt-info-vec.
#include "color_cpu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// One build runs everywhere: the AVX2 clone is picked at load time (ifunc) where the CPU has
// it, plain x86-64 (SSE2) elsewhere. Neither enables FMA, so both give identical results.
#ifndef AUGSVC_CPU_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AUGSVC_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AUGSVC_CPU_CLONES
#endif
#endif

namespace augsvc {

namespace {

// Pixels per block: the temporaries (4 KiB) stay in L1.
constexpr int kBlock = 256;

// log2(x) for normal x > 0; finite (-127) for x = 0, which callers mask out.
inline float Log2(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t e = (bits >> 23) - 127;
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f800000);  // x = m * 2^e, m in [1, 2)
  const bool big = m > 1.41421356f;  // centre m on 1: [sqrt(1/2), sqrt(2))
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  // ln(m) = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172: the series to t^9 is off by < 2e-9
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float atanh =
      t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  return static_cast<float>(e) + atanh * 2.88539008f;  // 2 / ln 2
}

// 2^y like powf would give it: +inf above 2^128, 0 below ~2^-126.5 (no subnormals).
inline float Exp2(float y) {
  y = y > -127.0f ? y : -127.0f;  // written as selects (not fmaxf) so they vectorise
  y = y < 128.0f ? y : 128.0f;
  // n = round(y): adding 1.5 * 2^23 leaves no fraction bits (exact for |y| < 2^22)
  const float n = (y + 12582912.0f) - 12582912.0f;
  const float g = (y - n) * 0.693147181f;  // 2^(y - n) = e^g, |g| <= 0.347
  // Taylor series to g^7: off by < 6e-9
  const float poly =
      1.0f +
      g * (1.0f +
           g * (1.0f / 2 +
                g * (1.0f / 6 +
                     g * (1.0f / 24 + g * (1.0f / 120 + g * (1.0f / 720 + g * (1.0f / 5040)))))));
  // 2^n from the exponent bits: n = -127 gives 0.0f, n = 128 gives +inf
  return poly * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline float Clip01Select(float x) {  // Clip01, NaN -> 0 as fminf(fmaxf(...)) does
  x = x > 0.0f ? x : 0.0f;
  return x < 1.0f ? x : 1.0f;
}

// c ? a : b with bit masks: g++ turns chains of ?: on the same int into multi-way branches
// (jump threading), which its vectoriser then refuses.
inline float Blend(bool c, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(c);
  return std::bit_cast<float>((std::bit_cast<int32_t>(a) & mask) |
                              (std::bit_cast<int32_t>(b) & ~mask));
}

// The value of a channel at rotated sector j (see the caller).
inline float Sector(int j, float v, float x, float pp) {
  const int dist = j >= 3 ? 5 - j : j;  // 0 for j = 0, 5; 1 for 1, 4; 2 for 2, 3
  return Blend(dist == 0, v, Blend(dist == 1, x, pp));
}

// clip(round-half-even(x), 0, 255) as ColorPixel's rintf + clip (0 and 255 are integers,
// so clipping first is the same); NaN -> 0.
inline uint8_t ToU8(float x) {
  x = x > 0.0f ? x : 0.0f;
  x = x < 255.0f ? x : 255.0f;
  // adding 2^23 leaves no fraction bits: the FPU rounds half to even (no -ffast-math here)
  return static_cast<uint8_t>(static_cast<int32_t>((x + 8388608.0f) - 8388608.0f));
}

}  // namespace

AUGSVC_CPU_CLONES
void ColorPixelsCpu(const uint8_t *in, uint8_t *out, int64_t npix, const ColorParams &p) {
  float vlut[256];  // V' for V = level / 255, exactly as ColorPixel computes it
  for (int level = 0; level < 256; level++)
    vlut[level] = PowScaleShift(level * (1.0f / 255.0f), p.val_pow, p.val_scale, p.val_shift);

  // The mod 1 below floors by truncation, valid for |H + shift| < 2^31: reduce the shift to
  // |shift| < 1 first (a no-op for the usual small shifts, so bit-identical there).
  float hue_shift = p.hue_shift;
  if (!(std::fabs(hue_shift) < 1.0f))
    hue_shift -= std::floor(hue_shift);
  const float a = p.sat_pow, m = p.sat_scale, d = p.sat_shift;
  const float off_r = p.offset[0], off_g = p.offset[1], off_b = p.offset[2];

  alignas(32) float hue[kBlock], sat[kBlock], val[kBlock];
  alignas(32) uint8_t red[kBlock], green[kBlock], blue[kBlock], vlevel[kBlock];
  for (int64_t start = 0; start < npix; start += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, npix - start));
    const uint8_t *src = in + 3 * start;
    uint8_t *dst = out + 3 * start;

    // Deinterleave (and interleave at the end) in plain loops: vectorising a stride-3 byte
    // access needs byte shuffles (SSSE3) that baseline x86-64 lacks, and it would then leave
    // the whole loop scalar.
    for (int k = 0; k < n; k++) {
      red[k] = src[3 * k];
      green[k] = src[3 * k + 1];
      blue[k] = src[3 * k + 2];
    }

    // colorsys.rgb_to_hsv and the hue jitter
    for (int k = 0; k < n; k++) {
      const int r8 = red[k], g8 = green[k], b8 = blue[k];
      const int max8 = std::max(r8, std::max(g8, b8));
      const int min8 = std::min(r8, std::min(g8, b8));
      const float r = r8 * (1.0f / 255.0f), g = g8 * (1.0f / 255.0f), b = b8 * (1.0f / 255.0f);
      const float maxc = max8 * (1.0f / 255.0f), minc = min8 * (1.0f / 255.0f);
      const float range = maxc - minc;
      // greys: divide by 1 instead of 0, and h = s = 0 fall out (rc = gc = bc = 0, range = 0)
      const float range_nz = max8 != min8 ? range : 1.0f;
      const float maxc_nz = max8 != 0 ? maxc : 1.0f;
      const float rc = (maxc - r) / range_nz;
      const float gc = (maxc - g) / range_nz;
      const float bc = (maxc - b) / range_nz;
      float h = r8 == max8 ? bc - gc : (g8 == max8 ? 2.0f + rc - bc : 4.0f + gc - rc);
      h = h / 6.0f;
      // (h + shift) mod 1 with floor = truncation corrected for negatives (|h| < 2 here)
      h += hue_shift;
      const float trunc = static_cast<float>(static_cast<int32_t>(h));
      h -= trunc > h ? trunc - 1.0f : trunc;
      hue[k] = h >= 1.0f ? 0.0f : h;  // a tiny negative h rounds to 1.0f
      sat[k] = range / maxc_nz;
      vlevel[k] = static_cast<uint8_t>(max8);
    }

    // V' from the table, in a loop of its own (a gather at best)
    for (int k = 0; k < n; k++)
      val[k] = vlut[vlevel[k]];

    // S', colorsys.hsv_to_rgb with selects, + offset, round, saturate
    for (int k = 0; k < n; k++) {
      const float s0 = sat[k];
      // pow for every lane, then select (no branch); exact for the common a = 1
      const float pw = a == 1.0f ? s0 : Exp2(a * Log2(s0));
      const float s = Clip01Select((s0 > 0.0f ? pw : 0.0f) * m + d);
      const float v = val[k];
      const float h6 = hue[k] * 6.0f;
      int i = static_cast<int>(h6);
      const float f = h6 - i;
      // s = 0 needs no branch: pp = q = t = v * 1.0f = v
      const float pp = v * (1.0f - s);
      const float q = v * (1.0f - s * f);
      const float t = v * (1.0f - s * (1.0f - f));
      i = i == 6 ? 0 : i;  // h * 6 may round up to 6: ColorPixel's i % 6
      // Sector i gives (R, G, B) = (v, t, pp), (q, v, pp), (pp, v, t), (pp, q, v), (t, pp, v),
      // (v, pp, q): each channel takes v, pp, or x = t (even i) / q (odd i), and rotating i by
      // 0, 4 and 2 gives R, G and B the same pattern: v at 0 and 5, x at 1 and 4, pp at 2 and 3.
      const float x = Blend(i & 1, q, t);
      const float rr = Sector(i, v, x, pp);
      const float gg = Sector(i >= 2 ? i - 2 : i + 4, v, x, pp);
      const float bb = Sector(i >= 4 ? i - 4 : i + 2, v, x, pp);
      red[k] = ToU8(rr * 255.0f + off_r);
      green[k] = ToU8(gg * 255.0f + off_g);
      blue[k] = ToU8(bb * 255.0f + off_b);
    }

    for (int k = 0; k < n; k++) {
      dst[3 * k] = red[k];
      dst[3 * k + 1] = green[k];
      dst[3 * k + 2] = blue[k];
    }
  }
}

}  // namespace augsvc
