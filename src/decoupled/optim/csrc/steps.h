#pragma once

// One-pass CPU steps for Adam/AdamW and SGD/SGDW over a whole list of tensors: the kernel's
// interface.
//
// The arithmetic is the reference loops' (decoupled/optim/adam.py `adam_update`,
// decoupled/optim/sgd.py `sgd_update`), element by element, in float32, in the same order and
// with the same roundings as the torch CPU operations that the reference calls. How close
// that comes (fused multiply-adds, sqrt) is told once, in decoupled/optim/_kernels.py's module
// docstring; here `fmadd` marks each place where torch's vectorized loops fuse, and
// -ffp-contract=off keeps the compiler from fusing any other multiply and add. What is faster:
//
//   * one parallel region per step for every tensor of the group: the tensors are cut into
//     chunks and the chunks shared among the threads, so a model of many small tensors pays
//     one fork/join instead of one per tensor (torch's fused kernels pay one per tensor);
//   * one pass over memory per element: read θ, g, m, v; write θ, m, v (28 bytes in float32);
//   * compact state: the moments may be kept in bfloat16 (20 bytes per step), rounded
//     stochastically so that updates smaller than a bfloat16 ulp are kept on average.
//
// Stochastic rounding adds 16 random bits below a bfloat16's last bit and truncates; the bits
// come from a hash of (element index, tensor position in the optimizer, step), mirrored in Python by
// decoupled/optim/_compact.py, so the reference path and this kernel round alike.
//
// Each op checks every tensor before touching any and returns false (changing nothing) when
// a tensor is not a dense CPU tensor of the expected dtype (float32; bfloat16/float16 θ, g and
// θ₀ with int8 remainders for compensated weights) laid out like its parameter, or a step
// count is negative or not finite: the caller then takes the reference path.
//
// This header declares the steps that bindings.cpp gives Python. Each is defined in a
// translation unit of its own, compiled in parallel: adam.cpp (float32 and bfloat16 moments),
// int8.cpp (int8 moments) and sgd.cpp. Each includes parts.h (the shared parts) and, in an
// anonymous namespace, its own element loop (int8_moments.h, sgd.h; adam.cpp holds its own).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

using Tensors = std::vector<at::Tensor>;  // what pybind11 makes of a Python list of tensors

namespace decoupled_kernels {

bool adam_step_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                const Tensors& references, const Tensors& steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, double decay, bool decoupled,
                bool amsgrad, bool maximize, double grad_scale, bool cautious,
                bool float32_lr, int64_t first_position);

bool adam_compensated_step_(const Tensors& params, const Tensors& remainders,
                            const Tensors& grads, const Tensors& exp_avgs,
                            const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                            const Tensors& references, const Tensors& steps, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            double decay, bool decoupled, bool amsgrad, bool maximize,
                            double grad_scale, bool cautious, bool float32_lr,
                            int64_t first_position);

bool adam_int8_step_(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                     const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                     const Tensors& exp_avg_scales, const Tensors& exp_avg_sq_scales,
                     const Tensors& references, const Tensors& steps, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double decay, bool decoupled,
                     bool maximize, double grad_scale, bool cautious, bool float32_lr,
                     int64_t first_position);

bool sgd_step_(const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
               const std::vector<bool>& fresh, const Tensors& references, double lr,
               double momentum, double dampening, bool nesterov, double weight_decay,
               double decay, bool decoupled, bool maximize, double grad_scale,
               bool cautious);

bool sgd_compensated_step_(const Tensors& params, const Tensors& remainders,
                           const Tensors& grads, const Tensors& momentum_buffers,
                           const std::vector<bool>& fresh, const Tensors& references,
                           double lr, double momentum, double dampening, bool nesterov,
                           double weight_decay, double decay, bool decoupled, bool maximize,
                           double grad_scale, bool cautious, double step,
                           int64_t first_position);

}  // namespace decoupled_kernels
