// SGD/SGDW: the steps sgd_step_ and sgd_compensated_step_ (steps.h); the element loop is in
// sgd.h.

#include "parts.h"

namespace {

#include "sgd.h"

}  // namespace

namespace decoupled_kernels {

bool sgd_step_(const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
               const std::vector<bool>& fresh, const Tensors& references, double lr,
               double momentum, double dampening, bool nesterov, double weight_decay,
               double decay, bool decoupled, bool maximize, double grad_scale,
               bool cautious) {
  return sgd_any_step(params, {}, grads, momentum_buffers, fresh, references, lr, momentum,
                      dampening, nesterov, weight_decay, decay, decoupled, maximize,
                      grad_scale, cautious, 0.0, 0);
}

// Compensated bfloat16/float16 θ: sgd_step_'s arguments with each parameter's int8
// remainder, the group's step count (1 at its first step) and the position of its first
// tensor in the optimizer, which key their rounding (as advance_steps' keys).
bool sgd_compensated_step_(const Tensors& params, const Tensors& remainders,
                           const Tensors& grads, const Tensors& momentum_buffers,
                           const std::vector<bool>& fresh, const Tensors& references,
                           double lr, double momentum, double dampening, bool nesterov,
                           double weight_decay, double decay, bool decoupled, bool maximize,
                           double grad_scale, bool cautious, double step,
                           int64_t first_position) {
  if (remainders.size() != params.size()) return false;
  if (params.empty()) return true;
  return sgd_any_step(params, remainders, grads, momentum_buffers, fresh, references, lr,
                      momentum, dampening, nesterov, weight_decay, decay, decoupled, maximize,
                      grad_scale, cautious, step, first_position);
}

}  // namespace decoupled_kernels
