// CPU backend of the colour op: the per-pixel math of color_math.h, reorganised in blocks of
// pixels so that g++ vectorises it (no DALI dependency, so a microbenchmark can link it alone).
#ifndef AUGSVC_KERNELS_COLOR_CPU_H_
#define AUGSVC_KERNELS_COLOR_CPU_H_

#include <cstdint>

#include "color_math.h"

namespace augsvc {

// Applies the colour op to `npix` interleaved RGB uint8 pixels, `in` -> `out` (may alias).
// Same contract as ColorPixel. S' uses a polynomial pow (relative error < 2e-6, absolute
// < 2e-7), so an output may differ from ColorPixel's by one level, only where the exact value
// is within ~1e-4 level of a x.5 tie (scripts/bench_color_kernel.cc checks all 2^24 colours).
void ColorPixelsCpu(const uint8_t *in, uint8_t *out, int64_t npix, const ColorParams &p);

}  // namespace augsvc

#endif  // AUGSVC_KERNELS_COLOR_CPU_H_
