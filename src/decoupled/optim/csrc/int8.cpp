// Adam/AdamW with int8 moments: the step adam_int8_step_ (steps.h); the block arithmetic is
// in int8_moments.h.

#include "parts.h"

namespace {

#include "int8_moments.h"

}  // namespace

namespace decoupled_kernels {

// Adam/AdamW (no amsgrad: _int8.py refuses it) with int8 moments, over float32 θ (`remainders`
// empty) or bfloat16/float16 θ compensated by int8 `remainders`; as adam_step_ otherwise.
bool adam_int8_step_(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                     const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                     const Tensors& exp_avg_scales, const Tensors& exp_avg_sq_scales,
                     const Tensors& references, const Tensors& steps, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double decay, bool decoupled,
                     bool maximize, double grad_scale, bool cautious, bool float32_lr,
                     int64_t first_position) {
  const size_t n = params.size();
  if (n == 0) return true;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  const bool ref = !references.empty();
  if (!usable_operands(params, remainders, grads, references) ||
      !usable_list(exp_avgs, params, at::kChar) || !usable_list(exp_avg_sqs, params, at::kByte) ||
      !usable_scales(exp_avg_scales, params) || !usable_scales(exp_avg_sq_scales, params) ||
      steps.size() != n) {
    return false;
  }
  if (!usable_steps(steps)) return false;
  const Int8Chunk chunk =
      pick_adam_int8(param_dtype, decay_mode(decoupled, weight_decay, decay), ref, cautious);
  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize, float32_lr,
                    first_position);
  for_each_unscaled_chunk(params, grads, grad_scale, [&](int64_t t, void* g, int64_t begin,
                                                         int64_t end) {
    chunk(params[t].data_ptr(), compensated ? remainders[t].data_ptr<int8_t>() : nullptr, g,
          exp_avgs[t].data_ptr<int8_t>(), exp_avg_sqs[t].data_ptr<uint8_t>(),
          exp_avg_scales[t].data_ptr<float>(), exp_avg_sq_scales[t].data_ptr<float>(),
          ref ? references[t].data_ptr() : nullptr, begin, end, scalars[t]);
  });
  bump_operands(params, remainders, grads, grad_scale);
  for (at::TensorList written : {exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps}) {
    bump_versions(written);
  }
  return true;
}

}  // namespace decoupled_kernels
