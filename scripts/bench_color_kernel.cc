// Microbenchmark and exhaustive accuracy check of the CPU colour kernel (no DALI needed):
// ColorPixel (color_math.h, the per-pixel code the CUDA kernel runs) against ColorPixelsCpu
// (color_cpu.cc, the CPU backend), single-threaded.
//
//   g++ -std=c++20 -O3 -fno-math-errno -fno-trapping-math -Wno-psabi -Ikernels
//       scripts/bench_color_kernel.cc kernels/color_cpu.cc -o /tmp/bench_color
//   /tmp/bench_color
//
// `--bench-only` skips the accuracy check. Add -DAUGSVC_NO_AVX2 to build without the AVX2
// kernel (the x86-64-v2 clone of the baseline runs), and -DAUGSVC_BASELINE_CLONES= as well for
// plain x86-64 (SSE2): every build must print the same output hash.
// Accuracy: all 2^24 RGB colours, for a set of parameter vectors, against a float64 oracle
// (augsvc/core/reference.py in C++): the max |out - oracle| in levels (the tests allow 0.51), and
// how many outputs differ from ColorPixel's (and how far from a rounding tie they are).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string_view>
#include <time.h>
#include <vector>

#include "color_cpu.h"
#include "color_math.h"

using augsvc::ColorParams;

namespace {

ColorParams Params(std::initializer_list<float> v) {
  std::vector<float> p(v);
  return augsvc::UnpackParams(p.data());
}

// augsvc.core.reference.color for one pixel, float64, unrounded, clipped to [0, 255].
void Oracle(const uint8_t *in, double *out, const ColorParams &p) {
  const double r = in[0] / 255.0, g = in[1] / 255.0, b = in[2] / 255.0;
  const double v = std::max({r, g, b});
  const double c = v - std::min({r, g, b});
  const double s = v > 0 ? c / v : 0.0;
  double h = 0.0;
  if (c > 0) {
    if (v == r)
      h = (g - b) / c < 0 ? (g - b) / c + 6.0 : (g - b) / c;  // np.mod(x, 6) for |x| <= 1
    else if (v == g)
      h = (b - r) / c + 2.0;
    else
      h = (r - g) / c + 4.0;
    h /= 6.0;
  }
  auto mod1 = [](double x) { return x - std::floor(x); };
  h = mod1(mod1(h) + double(p.hue_shift));
  auto pss = [](double x, double a, double m, double d) {
    return std::clamp(std::pow(x, a) * m + d, 0.0, 1.0);
  };
  const double s2 = pss(s, p.sat_pow, p.sat_scale, p.sat_shift);
  const double v2 = pss(v, p.val_pow, p.val_scale, p.val_shift);
  const double h6 = mod1(h) * 6.0;
  const double sector = std::floor(h6);
  const double f = h6 - sector;
  const int i = static_cast<int>(sector) % 6;
  const double pp = v2 * (1 - s2), q = v2 * (1 - s2 * f), t = v2 * (1 - s2 * (1 - f));
  const double rgb[6][3] = {{v2, t, pp}, {q, v2, pp}, {pp, v2, t},
                            {pp, q, v2}, {t, pp, v2}, {v2, pp, q}};
  for (int k = 0; k < 3; k++)
    out[k] = std::clamp(rgb[i][k] * 255.0 + p.offset[k], 0.0, 255.0);
}

// This thread's CPU time: other processes on a shared machine do not count against it.
double Seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <typename F>
double NsPerPixel(F run, int64_t npix) {
  double best = 1e30;
  for (int rep = 0; rep < 50; rep++) {  // the best of 50: caches and preemption only add time
    const double t0 = Seconds();
    run();
    best = std::min(best, Seconds() - t0);
  }
  return best * 1e9 / npix;
}

// ns/pixel of ColorPixel and ColorPixelsCpu on a 224x224 image, random pixels and a smooth
// image (branch-friendly for ColorPixel), one thread.
void Speed(const ColorParams &bp) {
  const int64_t npix = 224 * 224;
  std::vector<uint8_t> noise(3 * npix), smooth(3 * npix), out(3 * npix);
  std::mt19937 rng(0);
  for (auto &x : noise) x = static_cast<uint8_t>(rng());
  for (int64_t y = 0; y < 224; y++)
    for (int64_t x = 0; x < 224; x++) {
      uint8_t *px = &smooth[3 * (y * 224 + x)];
      px[0] = static_cast<uint8_t>(x + y / 4);
      px[1] = static_cast<uint8_t>(128 + 100 * std::sin(x * 0.05 + y * 0.02));
      px[2] = static_cast<uint8_t>(y);
    }
  for (const auto *img : {&noise, &smooth}) {
    const double before = NsPerPixel(
        [&] {
          for (int64_t k = 0; k < npix; k++)
            augsvc::ColorPixel(img->data() + 3 * k, out.data() + 3 * k, bp);
        },
        npix);
    const double after = NsPerPixel(
        [&] { augsvc::ColorPixelsCpu(img->data(), out.data(), npix, bp); }, npix);
    std::printf("%-7s 224x224: ColorPixel %6.2f ns/pixel, ColorPixelsCpu %6.2f ns/pixel (x%.1f)\n",
                img == &noise ? "random" : "smooth", before, after, before / after);
  }
}

}  // namespace

int main(int argc, char **argv) {
  const std::string_view mode = argc > 1 ? argv[1] : "";
  if (!mode.empty() && mode != "--bench-only" && mode != "--hash-only") {
    std::fprintf(stderr, "usage: %s [--bench-only | --hash-only]\n", argv[0]);
    return 2;
  }
  // The parameter vectors of tests/test_kernels.py's edge cases plus typical random ones.
  const std::vector<ColorParams> params = {
      Params({0, 1, 1, 0, 1, 1, 0, 0, 0, 0}),
      Params({0.1f, 1, 1, 0, 1, 1, 0, 0, 0, 0}),
      Params({-0.1f, 1, 1, 0, 1, 1, 0, 0, 0, 0}),
      Params({-1e-7f, 1, 1, 0, 1, 1, 0, 0, 0, 0}),
      Params({0.5f, 1, 1, 0, 1, 1, 0, 0, 0, 0}),
      Params({0.0f, 0.25f, 1, 0, 0.25f, 1, 0, 0, 0, 0}),
      Params({0.0f, 4, 1, 0, 4, 1, 0, 0, 0, 0}),
      Params({0.03f, 0.25f, 1.4f, 0.1f, 4, 0.7f, -0.1f, 0, 0, 0}),
      Params({-0.07f, 4, 0.7f, -0.1f, 0.25f, 1.4f, 0.1f, 0, 0, 0}),
      Params({0.0f, 1, 1, 0.1f, 1, 1, 0, 0, 0, 0}),
      Params({0.09f, 2, 1.2f, 0.05f, 0.5f, 0.9f, 0.02f, -3.3f, 7.1f, -2.5f}),
      Params({0.043f, 1.7f, 1.13f, -0.04f, 0.61f, 0.93f, 0.031f, 4.2f, -9.7f, 1.3f}),
      Params({-0.087f, 0.37f, 0.81f, 0.07f, 2.9f, 1.21f, -0.06f, -11.f, 3.4f, 6.6f}),
      Params({2.7f, 3.3f, 1.05f, 0.0f, 1.0f, 1.0f, 0.0f, 0, 0, 0}),  // |hue shift| > 1
      Params({-5.35f, 0.8f, 1.3f, 0.0f, 1.0f, 1.0f, 0.0f, 0, 0, 0}),
      // the ends of the spec's ranges: exponents 1/16 and 16, scales 0 and 16, shifts +-1
      Params({0.5f, 0.0625f, 1, 0, 0.0625f, 1, 0, 0, 0, 0}),
      Params({-0.5f, 16, 1, 0, 16, 1, 0, 0, 0, 0}),
      Params({0.25f, 16, 16, 0, 0.0625f, 16, 0, 0, 0, 0}),
      Params({-0.25f, 0.0625f, 16, -1, 16, 0, 1, 0, 0, 0}),
      Params({0.1f, 3.7f, 0.05f, 0.97f, 0.3f, 1.0f, -0.02f, 100, -100, 0.4f}),
      Params({0.07f, 1.0001f, 1.0f, 0.0f, 0.9999f, 1.0f, 0.0f, 0.5f, -0.5f, 0}),
      // exponents outside ColorPixelsCpu's fast path: it runs ColorPixel
      Params({0.03f, 100, 1.1f, 0, 0.5f, 1, 0, 0, 0, 0}),
      Params({0.03f, 1.3f, 1, 0, 70, 1, 0, 1, 2, 3}),
  };

  // ---- speed
  if (mode != "--hash-only")
    Speed(params[11]);
  if (mode == "--bench-only")
    return 0;

  // ---- accuracy: every RGB colour; ColorPixelsCpu runs in place, on runs of pixels of
  // uneven lengths (partial blocks and vectors)
  const int64_t ncol = int64_t(1) << 24;
  std::vector<uint8_t> all(3 * ncol), a_out(3 * ncol), b_out;
  for (int64_t c = 0; c < ncol; c++) {
    all[3 * c] = c >> 16;
    all[3 * c + 1] = (c >> 8) & 255;
    all[3 * c + 2] = c & 255;
  }
  bool ok = true;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a of every ColorPixelsCpu output: compare builds
  for (size_t j = 0; j < params.size(); j++) {
    const ColorParams &p = params[j];
    b_out = all;
    const int64_t runs[] = {1, 7, 255, 257, 1000, 65536};
    for (int64_t start = 0, k = 0; start < ncol; k++) {
      const int64_t n = std::min(runs[k % std::size(runs)], ncol - start);
      augsvc::ColorPixelsCpu(&b_out[3 * start], &b_out[3 * start], n, p);
      start += n;
    }
    for (uint8_t x : b_out)
      hash = (hash ^ x) * 1099511628211ull;
    if (mode == "--hash-only")
      continue;
    for (int64_t c = 0; c < ncol; c++)
      augsvc::ColorPixel(&all[3 * c], &a_out[3 * c], p);
    double worst_old = 0, worst_new = 0, worst_tie = 0;
    int64_t differ = 0;
    for (int64_t c = 0; c < ncol; c++) {
      double o[3];
      Oracle(&all[3 * c], o, p);
      for (int k = 0; k < 3; k++) {
        worst_old = std::max(worst_old, std::fabs(a_out[3 * c + k] - o[k]));
        worst_new = std::max(worst_new, std::fabs(b_out[3 * c + k] - o[k]));
        if (a_out[3 * c + k] != b_out[3 * c + k]) {
          differ++;
          worst_tie = std::max(worst_tie, std::fabs(o[k] - std::floor(o[k]) - 0.5));
        }
      }
    }
    ok = ok && worst_new <= 0.51;
    std::printf("params %2zu: max |out - oracle| ColorPixel %.6f, ColorPixelsCpu %.6f levels; "
                "%lld channels differ, all within %.2g of a tie\n",
                j, worst_old, worst_new, static_cast<long long>(differ), worst_tie);
  }
  std::printf("output hash %016llx\n", static_cast<unsigned long long>(hash));
  if (mode == "--hash-only")
    return 0;
  std::printf(ok ? "OK\n" : "FAILED: off by more than 0.51 levels\n");
  return ok ? 0 : 1;
}
