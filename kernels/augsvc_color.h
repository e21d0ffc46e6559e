// AugsvcColor: exact HSV power/scale/shift + hue rotation + fancy-PCA offset, one pass per pixel.
// Input 0: uint8 HWC RGB images; argument input "params": float32 (10,) per sample.
#ifndef AUGSVC_KERNELS_AUGSVC_COLOR_H_
#define AUGSVC_KERNELS_AUGSVC_COLOR_H_

#include <cmath>
#include <vector>

#include "dali/pipeline/operator/arg_helper.h"
#include "dali/pipeline/operator/operator.h"
#include "color_math.h"

namespace augsvc {

template <typename Backend>
class AugsvcColor : public ::dali::Operator<Backend> {
 public:
  explicit AugsvcColor(const ::dali::OpSpec &spec)
      : ::dali::Operator<Backend>(spec), params_arg_("params", spec) {}

  AugsvcColor(const AugsvcColor &) = delete;
  AugsvcColor &operator=(const AugsvcColor &) = delete;

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc,
                 const ::dali::Workspace &ws) override {  // true: outputs inferred here
    const auto &input = ws.Input<Backend>(0);
    const auto &shape = input.shape();
    const int nsamples = shape.num_samples();
    DALI_ENFORCE(input.type() == DALI_UINT8,
                 ::dali::make_string("AugsvcColor: expected uint8 images, got ", input.type()));
    DALI_ENFORCE(shape.sample_dim() == 3,
                 ::dali::make_string("AugsvcColor: expected HWC images (3 dims), got ",
                                     shape.sample_dim(), " dims"));
    for (int i = 0; i < nsamples; i++)
      DALI_ENFORCE(shape.tensor_shape_span(i)[2] == 3,
                   ::dali::make_string("AugsvcColor: sample ", i, " has ",
                                       shape.tensor_shape_span(i)[2],
                                       " channels; expected 3 (RGB)"));

    params_arg_.Acquire(this->spec_, ws, nsamples, ::dali::TensorShape<1>{kNumParams});
    params_.resize(nsamples);
    for (int i = 0; i < nsamples; i++) {
      const float *p = params_arg_[i].data;
      for (int k = 0; k < kNumParams; k++)
        DALI_ENFORCE(std::isfinite(p[k]),
                     ::dali::make_string("AugsvcColor: params[", k, "] of sample ", i,
                                         " is not finite"));
      params_[i] = UnpackParams(p);
    }

    output_desc.resize(1);
    output_desc[0] = {shape, DALI_UINT8};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override;

 private:
  ::dali::ArgValue<float, 1> params_arg_;
  std::vector<ColorParams> params_;  // unpacked in SetupImpl, used by RunImpl
};

}  // namespace augsvc

#endif  // AUGSVC_KERNELS_AUGSVC_COLOR_H_
