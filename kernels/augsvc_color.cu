// CUDA backend and the GPU registration of AugsvcColor.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "augsvc_color.h"
#include "dali/kernels/dynamic_scratchpad.h"

namespace augsvc {

namespace {

struct SampleDesc {
  const uint8_t *in;
  uint8_t *out;
  int64_t npix;
  ColorParams params;
};

constexpr int kBlock = 256;

// blockIdx.y walks the samples, x the pixels of a sample (grid-stride on both).
__global__ void ColorKernel(const SampleDesc *samples, int nsamples) {
  for (int s = blockIdx.y; s < nsamples; s += gridDim.y) {
    const SampleDesc d = samples[s];
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < d.npix;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
      ColorPixel(d.in + 3 * k, d.out + 3 * k, d.params);
  }
}

}  // namespace

template <>
void AugsvcColor<::dali::GPUBackend>::RunImpl(::dali::Workspace &ws) {
  const auto &input = ws.Input<::dali::GPUBackend>(0);
  auto &output = ws.Output<::dali::GPUBackend>(0);
  output.SetLayout(input.GetLayout());
  const auto &shape = input.shape();
  const int nsamples = shape.num_samples();
  if (nsamples == 0)
    return;

  ::dali::kernels::DynamicScratchpad scratch(::dali::AccessOrder(ws.stream()));
  SampleDesc *host = scratch.AllocatePinned<SampleDesc>(nsamples);
  int64_t max_npix = 0;
  for (int i = 0; i < nsamples; i++) {
    host[i].in = static_cast<const uint8_t *>(input.raw_tensor(i));
    host[i].out = static_cast<uint8_t *>(output.raw_mutable_tensor(i));
    host[i].npix = shape.tensor_size(i) / 3;
    host[i].params = params_[i];
    max_npix = std::max(max_npix, host[i].npix);
  }
  if (max_npix == 0)
    return;
  SampleDesc *dev = scratch.AllocateGPU<SampleDesc>(nsamples);
  CUDA_CALL(cudaMemcpyAsync(dev, host, nsamples * sizeof(SampleDesc), cudaMemcpyHostToDevice,
                            ws.stream()));

  const int64_t blocks_x = std::min<int64_t>((max_npix + kBlock - 1) / kBlock, 1024);
  const dim3 grid(static_cast<unsigned>(blocks_x), std::min(nsamples, 65535));
  ColorKernel<<<grid, kBlock, 0, ws.stream()>>>(dev, nsamples);
  CUDA_CALL(cudaGetLastError());
}

}  // namespace augsvc

DALI_REGISTER_OPERATOR(AugsvcColor, ::augsvc::AugsvcColor<::dali::GPUBackend>, ::dali::GPU);
