// CPU backend, the schema and the CPU registration of AugsvcColor.
#include <algorithm>
#include <cstdint>

#include "augsvc_color.h"
#include "color_cpu.h"

namespace augsvc {

namespace {
// Pixels per thread-pool task: big images are split so that few samples still use all threads.
constexpr int64_t kPixelsPerTask = 1 << 16;
}  // namespace

template <>
void AugsvcColor<::dali::CPUBackend>::RunImpl(::dali::Workspace &ws) {
  const auto &input = ws.Input<::dali::CPUBackend>(0);
  auto &output = ws.Output<::dali::CPUBackend>(0);
  output.SetLayout(input.GetLayout());
  const auto &shape = input.shape();
  auto &tp = ws.GetThreadPool();
  for (int i = 0; i < shape.num_samples(); i++) {
    const int64_t npix = shape.tensor_size(i) / 3;
    const auto *in = static_cast<const uint8_t *>(input.raw_tensor(i));
    auto *out = static_cast<uint8_t *>(output.raw_mutable_tensor(i));
    const ColorParams *p = &params_[i];
    for (int64_t start = 0; start < npix; start += kPixelsPerTask) {
      const int64_t end = std::min(npix, start + kPixelsPerTask);
      tp.AddWork(
          [in, out, p, start, end](int) {
            ColorPixelsCpu(in + 3 * start, out + 3 * start, end - start, *p);
          },
          end - start);
    }
  }
  tp.RunAll();
}

}  // namespace augsvc

DALI_REGISTER_OPERATOR(AugsvcColor, ::augsvc::AugsvcColor<::dali::CPUBackend>, ::dali::CPU);

DALI_SCHEMA(AugsvcColor)
    .DocStr(R"(Exact HSV colour jitter plus a fancy-PCA offset, in one pass per pixel.

Per pixel: RGB->HSV (hexcone, as Python's colorsys), S' = clip(S**sat_pow*sat_scale+sat_shift, 0, 1),
V' = clip(V**val_pow*val_scale+val_shift, 0, 1), H' = (H+hue_shift) mod 1, HSV->RGB,
out = clip(round(rgb'*255 + offset), 0, 255).)")
    .NumInput(1)
    .NumOutput(1)
    .InputDox(0, "images", "TensorList", "uint8 HWC RGB images (3 channels, any H and W).")
    .AddArg("params",
            "Per sample, 10 float32 values: hue_shift, sat_pow, sat_scale, sat_shift, val_pow, "
            "val_scale, val_shift, offset_r, offset_g, offset_b (offsets in uint8 levels).",
            DALI_FLOAT_VEC, true);
