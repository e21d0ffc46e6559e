// CPU backend of the colour op: the math of color_math.h, vectorised over blocks of pixels
// (no DALI dependency, so a microbenchmark can link it alone).
#ifndef AUGSVC_KERNELS_COLOR_CPU_H_
#define AUGSVC_KERNELS_COLOR_CPU_H_

#include <cstdint>

#include "color_math.h"

namespace augsvc {

// Applies the colour op to `npix` interleaved RGB uint8 pixels, `in` -> `out` (may alias).
// Same contract as ColorPixel. For exponents in (0, 64] (the spec allows (0, 16]), pow is
// polynomial (off by < 2e-3 level up to 16), so an output may differ from ColorPixel's by one
// level, only where the exact value is that close to a x.5 tie; other exponents run
// ColorPixel itself (scripts/bench_color_kernel.cc checks all 2^24 colours).
void ColorPixelsCpu(const uint8_t *in, uint8_t *out, int64_t npix, const ColorParams &p);

}  // namespace augsvc

#endif  // AUGSVC_KERNELS_COLOR_CPU_H_
