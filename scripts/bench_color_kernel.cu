// The CUDA colour kernel alone: img/s on a batch of 224x224 uint8 RGB images, no DALI.
//
//   nvcc -std=c++20 -O3 -gencode=arch=compute_90,code=sm_90 -Ikernels \
//       scripts/bench_color_kernel.cu -o bench_color_gpu && ./bench_color_gpu [batch] [side]
//
// Runs ColorPixel (kernels/color_math.h, what the plugin's GPU backend runs per pixel) over
// `batch` images of side x side (default 256 and 224) with random pixels and parameters
// drawn from the default spec's ranges, times 200 launches with CUDA events after 20
// warm-ups, and compares the device's output with the same function run on the host.
// Prints one line of JSON: {"img_s": ..., "gb_s": ..., "max_diff_levels": ...}.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "color_math.h"

namespace {

constexpr int kBlock = 256;

__global__ void ColorBatch(const uint8_t *in, uint8_t *out, const augsvc::ColorParams *params,
                           int64_t npix, int nsamples) {
  for (int s = blockIdx.y; s < nsamples; s += gridDim.y) {
    const augsvc::ColorParams p = params[s];
    const uint8_t *src = in + 3 * npix * s;
    uint8_t *dst = out + 3 * npix * s;
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < npix;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
      augsvc::ColorPixel(src + 3 * k, dst + 3 * k, p);
  }
}

void Check(cudaError_t err, const char *what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char **argv) {
  const int batch = argc > 1 ? std::atoi(argv[1]) : 256;
  const int side = argc > 2 ? std::atoi(argv[2]) : 224;
  const int64_t npix = static_cast<int64_t>(side) * side;
  const size_t bytes = static_cast<size_t>(3 * npix) * batch;

  std::mt19937 rng(0);
  std::uniform_int_distribution<int> level(0, 255);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<uint8_t> host_in(bytes), host_out(bytes);
  for (auto &v : host_in) v = static_cast<uint8_t>(level(rng));
  std::vector<augsvc::ColorParams> params(batch);
  for (auto &p : params) {
    float raw[augsvc::kNumParams] = {
        -0.1f + 0.2f * unit(rng), std::exp(std::log(0.25f) + std::log(16.0f) * unit(rng)),
        0.7f + 0.7f * unit(rng), -0.1f + 0.2f * unit(rng),
        std::exp(std::log(0.25f) + std::log(16.0f) * unit(rng)), 0.7f + 0.7f * unit(rng),
        -0.1f + 0.2f * unit(rng), 10.0f * (unit(rng) - 0.5f), 10.0f * (unit(rng) - 0.5f),
        10.0f * (unit(rng) - 0.5f)};
    p = augsvc::UnpackParams(raw);
  }

  uint8_t *d_in = nullptr, *d_out = nullptr;
  augsvc::ColorParams *d_params = nullptr;
  Check(cudaMalloc(&d_in, bytes), "cudaMalloc in");
  Check(cudaMalloc(&d_out, bytes), "cudaMalloc out");
  Check(cudaMalloc(&d_params, batch * sizeof(augsvc::ColorParams)), "cudaMalloc params");
  Check(cudaMemcpy(d_in, host_in.data(), bytes, cudaMemcpyHostToDevice), "copy in");
  Check(cudaMemcpy(d_params, params.data(), batch * sizeof(augsvc::ColorParams),
                   cudaMemcpyHostToDevice), "copy params");

  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((npix + kBlock - 1) / kBlock, 1024)),
                  std::min(batch, 65535));
  for (int i = 0; i < 20; i++) ColorBatch<<<grid, kBlock>>>(d_in, d_out, d_params, npix, batch);
  Check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const int iters = 200;
  cudaEventRecord(start);
  for (int i = 0; i < iters; i++) ColorBatch<<<grid, kBlock>>>(d_in, d_out, d_params, npix, batch);
  cudaEventRecord(stop);
  Check(cudaEventSynchronize(stop), "timed launches");
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, start, stop);
  Check(cudaMemcpy(host_out.data(), d_out, bytes, cudaMemcpyDeviceToHost), "copy out");

  int max_diff = 0;
  uint8_t expect[3];
  for (int s = 0; s < batch; s += std::max(1, batch / 8))
    for (int64_t k = 0; k < npix; k++) {
      const size_t at = static_cast<size_t>(3 * (npix * s + k));
      augsvc::ColorPixel(&host_in[at], expect, params[s]);
      for (int c = 0; c < 3; c++)
        max_diff = std::max(max_diff, std::abs(int(expect[c]) - int(host_out[at + c])));
    }
  const double seconds = ms / 1e3;
  const double img_s = static_cast<double>(batch) * iters / seconds;
  std::printf("{\"img_s\": %.0f, \"gb_s\": %.1f, \"max_diff_levels\": %d, \"batch\": %d, "
              "\"side\": %d}\n", img_s, 2.0 * bytes * iters / seconds / 1e9, max_diff, batch, side);
  return max_diff > 1 ? 2 : 0;
}
