// Per-pixel math of the augsvc colour op, shared by the CPU (.cc) and CUDA (.cu) backends.
// RGB<->HSV follow Python's colorsys (hexcone model) exactly, in float32.
#ifndef AUGSVC_KERNELS_COLOR_MATH_H_
#define AUGSVC_KERNELS_COLOR_MATH_H_

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define AUGSVC_HD __host__ __device__ inline
#else
#define AUGSVC_HD inline
#endif

namespace augsvc {

// Per-sample parameters, in the order of the Python contract (10 float32 values).
constexpr int kNumParams = 10;

struct ColorParams {
  float hue_shift;
  float sat_pow, sat_scale, sat_shift;
  float val_pow, val_scale, val_shift;
  float offset[3];  // fancy-PCA offset per channel, in uint8 levels
};

AUGSVC_HD ColorParams UnpackParams(const float *p) {
  ColorParams c;
  c.hue_shift = p[0];
  c.sat_pow = p[1];
  c.sat_scale = p[2];
  c.sat_shift = p[3];
  c.val_pow = p[4];
  c.val_scale = p[5];
  c.val_shift = p[6];
  c.offset[0] = p[7];
  c.offset[1] = p[8];
  c.offset[2] = p[9];
  return c;
}

AUGSVC_HD float Clip01(float x) {
  return fminf(fmaxf(x, 0.0f), 1.0f);
}

// clip(x ** a * m + d, 0, 1), with 0 ** a = 0.
AUGSVC_HD float PowScaleShift(float x, float a, float m, float d) {
  float y = x > 0.0f ? powf(x, a) : 0.0f;
  return Clip01(y * m + d);
}

// Applies the colour op to one pixel: in/out are 3 uint8 values (R, G, B).
AUGSVC_HD void ColorPixel(const uint8_t *in, uint8_t *out, const ColorParams &p) {
  const float r = in[0] * (1.0f / 255.0f);
  const float g = in[1] * (1.0f / 255.0f);
  const float b = in[2] * (1.0f / 255.0f);

  // colorsys.rgb_to_hsv
  const float maxc = fmaxf(r, fmaxf(g, b));
  const float minc = fminf(r, fminf(g, b));
  float h = 0.0f, s = 0.0f;
  const float v = maxc;
  if (maxc != minc) {
    const float range = maxc - minc;
    s = range / maxc;
    const float rc = (maxc - r) / range;
    const float gc = (maxc - g) / range;
    const float bc = (maxc - b) / range;
    if (r == maxc)
      h = bc - gc;
    else if (g == maxc)
      h = 2.0f + rc - bc;
    else
      h = 4.0f + gc - rc;
    h = h / 6.0f;
  }

  // jitter; (H + shift) mod 1 lands in [0, 1) for any sign
  h += p.hue_shift;
  h -= floorf(h);
  if (h >= 1.0f)  // a tiny negative h rounds to 1.0f
    h = 0.0f;
  s = PowScaleShift(s, p.sat_pow, p.sat_scale, p.sat_shift);
  const float v2 = PowScaleShift(v, p.val_pow, p.val_scale, p.val_shift);

  // colorsys.hsv_to_rgb
  float rgb[3];
  if (s == 0.0f) {
    rgb[0] = rgb[1] = rgb[2] = v2;
  } else {
    int i = static_cast<int>(h * 6.0f);
    const float f = h * 6.0f - i;
    const float pp = v2 * (1.0f - s);
    const float q = v2 * (1.0f - s * f);
    const float t = v2 * (1.0f - s * (1.0f - f));
    switch (i % 6) {
      case 0: rgb[0] = v2; rgb[1] = t;  rgb[2] = pp; break;
      case 1: rgb[0] = q;  rgb[1] = v2; rgb[2] = pp; break;
      case 2: rgb[0] = pp; rgb[1] = v2; rgb[2] = t;  break;
      case 3: rgb[0] = pp; rgb[1] = q;  rgb[2] = v2; break;
      case 4: rgb[0] = t;  rgb[1] = pp; rgb[2] = v2; break;
      default: rgb[0] = v2; rgb[1] = pp; rgb[2] = q; break;
    }
  }

  // + fancy-PCA offset, round half to even, saturate
  for (int c = 0; c < 3; c++) {
    const float x = rintf(rgb[c] * 255.0f + p.offset[c]);
    out[c] = static_cast<uint8_t>(fminf(fmaxf(x, 0.0f), 255.0f));
  }
}

}  // namespace augsvc

#endif  // AUGSVC_KERNELS_COLOR_MATH_H_
