// Adam/AdamW with float32 or bfloat16 moments: the element loop over float32 and compensated
// θ, and the steps adam_step_ and adam_compensated_step_ (steps.h).

#include "parts.h"

namespace {

// ---- Adam/AdamW: the element loop, for float32 and compensated θ ---------------------------

// `count` elements starting at element `first` of their tensor (the pointers already point
// there). A 32-bit loop counter keeps the hash's index arithmetic in 32-bit vector lanes.
// Cautious: decay after m_t, masked by the sign of m_t (that of m̂/(sqrt(v̂)+ε)).
// T is θ's storage: float, or bfloat16 (uint16_t)/float16 (int16_t) words compensated by the
// remainders `r` (nullptr for float); g and θ₀ are in θ's dtype, read as float32 (grad.float(),
// reference.float() in the reference loop).
template <typename T, typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious = false>
__attribute__((always_inline)) inline void adam_elements(
    T* __restrict p, int8_t* __restrict r, const T* __restrict g, S* __restrict m,
    S* __restrict v, S* __restrict vmax, const T* __restrict ref, uint32_t first,
    int32_t count, const AdamScalars& s) {
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    float grad, param = load_weight(p, r, k);
    apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, load(g[k]), ref, k, s.decay);
    float exp_avg = lerp(load(m[k]), grad, s.beta1_weight);
    // v.mul_(β2).addcmul_(g, g, value=1 − β2): torch fuses ((1 − β2)·g)·g + β2·v
    float exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, load(v[k]) * s.beta2);
    if constexpr (Cautious) cautious_decay<Ref>(param, exp_avg, ref, k, s.decay);
    float second = exp_avg_sq;
    uint32_t random = mix((first + static_cast<uint32_t>(k)) ^ s.key);
    const uint32_t rehash = mix(random);
    if constexpr (Amsgrad) {
      float previous = load(vmax[k]);
      // torch.maximum: a NaN in either operand gives NaN
      second = (previous > exp_avg_sq || previous != previous) ? previous : exp_avg_sq;
      store(&vmax[k], second, rehash & 0xFFFFU);
    }
    float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
    // addcdiv_: not fused in torch
    store_weight(p, r, k, param + s.lr_neg_step_size * exp_avg / denom, rehash);
    store(&m[k], exp_avg, random & 0xFFFFU);
    store(&v[k], exp_avg_sq, random >> 16);
  }
}

// Software prefetch of every stream kAhead elements ahead, one block of kBlock elements at a
// time. It pays only with bfloat16 state: measured on one core of this Zen 4 machine, the
// bfloat16 step streamed 2.4–2.5 G params/s without it and 2.9–3.1 with it, when one core's
// memory parallelism (not the memory bus) is the limit; float32 gained nothing.
constexpr int32_t kBlock = 64;
constexpr int32_t kAhead = 1024;

template <typename T>
inline void prefetch_block(const T* base, int32_t k) {
  // prefetching past the end of an allocation is harmless: prefetches never fault
  const char* start = reinterpret_cast<const char*>(base + k + kAhead);
  for (size_t offset = 0; offset < kBlock * sizeof(T); offset += 64) {
    __builtin_prefetch(start + offset, 1, 3);
  }
}

// One chunk of a tensor: its elements [first, first + count).
template <typename T, typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious>
void adam_chunk(T* __restrict p, int8_t* __restrict r, const T* __restrict g, S* __restrict m,
                S* __restrict v, S* __restrict vmax, const T* __restrict ref, uint32_t first,
                int32_t count, AdamScalars s) {
  constexpr bool compensated = !std::is_same_v<T, float>;
  // always inlined: left out of line (GCC did so for float16 θ), the loop is a call per block
  const auto elements = [&](int32_t k, int32_t n) __attribute__((always_inline)) {
    adam_elements<T, S, Amsgrad, D, Ref, Cautious>(
        p + k, compensated ? r + k : nullptr, g + k, m + k, v + k,
        Amsgrad ? vmax + k : nullptr, Ref ? ref + k : nullptr, first + k, n, s);
  };
  int32_t k = 0;
  if constexpr (sizeof(S) < sizeof(float) || compensated) {
    for (; k + kBlock <= count; k += kBlock) {
      prefetch_block(p, k);
      if constexpr (compensated) prefetch_block(r, k);
      prefetch_block(g, k);
      prefetch_block(m, k);
      prefetch_block(v, k);
      if constexpr (Amsgrad) prefetch_block(vmax, k);
      if constexpr (Ref) prefetch_block(ref, k);
      elements(k, kBlock);
    }
  }
  elements(k, count - k);
}

// θ, g, θ₀ of dtype T, moments of dtype S, the remainders (compensated T) or nullptr.
using AdamChunk = void (*)(void*, int8_t*, const void*, void*, void*, void*, const void*,
                           int64_t, int64_t, AdamScalars);

template <typename T, typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious>
void adam_chunk_erased(void* p, int8_t* r, const void* g, void* m, void* v, void* vmax,
                       const void* ref, int64_t begin, int64_t end, AdamScalars s) {
  auto at = [begin](void* base) { return base ? static_cast<S*>(base) + begin : nullptr; };
  adam_chunk<T, S, Amsgrad, D, Ref, Cautious>(
      static_cast<T*>(p) + begin, r ? r + begin : nullptr, static_cast<const T*>(g) + begin,
      at(m), at(v), at(vmax), ref ? static_cast<const T*>(ref) + begin : nullptr,
      static_cast<uint32_t>(begin), static_cast<int32_t>(end - begin), s);
}

template <typename T, typename S, bool Amsgrad, Decay D, bool Cautious = false>
AdamChunk pick_adam(bool ref) {
  return ref ? adam_chunk_erased<T, S, Amsgrad, D, true, Cautious>
             : adam_chunk_erased<T, S, Amsgrad, D, false, Cautious>;
}

template <typename T, typename S, bool Amsgrad>
AdamChunk pick_adam(Decay decay, bool ref, bool cautious) {
  switch (decay) {
    case Decay::kL2: return pick_adam<T, S, Amsgrad, Decay::kL2>(ref);
    case Decay::kDecoupled:
      return cautious ? pick_adam<T, S, Amsgrad, Decay::kDecoupled, true>(ref)
                      : pick_adam<T, S, Amsgrad, Decay::kDecoupled>(ref);
    default: return pick_adam<T, S, Amsgrad, Decay::kNone>(ref);
  }
}

template <typename T>
AdamChunk pick_adam(bool compact, bool amsgrad, Decay decay, bool ref, bool cautious) {
  if (compact) {
    return amsgrad ? pick_adam<T, uint16_t, true>(decay, ref, cautious)
                   : pick_adam<T, uint16_t, false>(decay, ref, cautious);
  }
  return amsgrad ? pick_adam<T, float, true>(decay, ref, cautious)
                 : pick_adam<T, float, false>(decay, ref, cautious);
}

// θ's dtype: float32, or bfloat16/float16 compensated (the only low-precision θ stepped here)
AdamChunk pick_adam(at::ScalarType param_dtype, bool compact, bool amsgrad, Decay decay,
                    bool ref, bool cautious) {
  switch (param_dtype) {
    case at::kBFloat16: return pick_adam<uint16_t>(compact, amsgrad, decay, ref, cautious);
    case at::kHalf: return pick_adam<int16_t>(compact, amsgrad, decay, ref, cautious);
    default: return pick_adam<float>(compact, amsgrad, decay, ref, cautious);
  }
}

// Adam/AdamW over float32 θ (`remainders` empty), or over bfloat16/float16 θ compensated by
// int8 `remainders` (adam_compensated_step_); g and θ₀ in θ's dtype, float32 or bfloat16
// moments.
bool adam_any_step(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                   const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                   const Tensors& max_exp_avg_sqs, const Tensors& references,
                   const Tensors& steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double decay, bool decoupled, bool amsgrad,
                   bool maximize, double grad_scale, bool cautious, bool float32_lr,
                   int64_t first_position) {
  const size_t n = params.size();
  if (n == 0) return true;
  if (exp_avgs.size() != n) return false;
  const auto state_dtype = exp_avgs[0].scalar_type();
  if (state_dtype != at::kFloat && state_dtype != at::kBFloat16) return false;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  const bool ref = !references.empty();
  if (!usable_operands(params, remainders, grads, references) ||
      !usable_list(exp_avgs, params, state_dtype) ||
      !usable_list(exp_avg_sqs, params, state_dtype) ||
      (amsgrad && !usable_list(max_exp_avg_sqs, params, state_dtype)) || steps.size() != n) {
    return false;
  }
  if (!usable_steps(steps)) return false;

  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  const AdamChunk chunk =
      pick_adam(param_dtype, state_dtype == at::kBFloat16, amsgrad, mode, ref, cautious);

  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize, float32_lr,
                    first_position);
  for_each_unscaled_chunk(params, grads, grad_scale, [&](int64_t t, void* g, int64_t begin,
                                                         int64_t end) {
    chunk(params[t].data_ptr(), compensated ? remainders[t].data_ptr<int8_t>() : nullptr, g,
          exp_avgs[t].data_ptr(), exp_avg_sqs[t].data_ptr(),
          amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr,
          ref ? references[t].data_ptr() : nullptr, begin, end, scalars[t]);
  });
  bump_operands(params, remainders, grads, grad_scale);
  for (at::TensorList written : {exp_avgs, exp_avg_sqs, steps}) bump_versions(written);
  if (amsgrad) bump_versions(max_exp_avg_sqs);
  return true;
}

}  // namespace

namespace decoupled_kernels {

bool adam_step_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                const Tensors& references, const Tensors& steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, double decay, bool decoupled,
                bool amsgrad, bool maximize, double grad_scale, bool cautious,
                bool float32_lr, int64_t first_position) {
  return adam_any_step(params, {}, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references,
                       steps, lr, beta1, beta2, eps, weight_decay, decay, decoupled, amsgrad,
                       maximize, grad_scale, cautious, float32_lr, first_position);
}

// Compensated bfloat16/float16 θ (the section "Compensated ... weights" above): adam_step_'s
// arguments with each parameter's int8 remainder; θ, g and θ₀ share θ's dtype.
bool adam_compensated_step_(const Tensors& params, const Tensors& remainders,
                            const Tensors& grads, const Tensors& exp_avgs,
                            const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                            const Tensors& references, const Tensors& steps, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            double decay, bool decoupled, bool amsgrad, bool maximize,
                            double grad_scale, bool cautious, bool float32_lr,
                            int64_t first_position) {
  if (remainders.size() != params.size()) return false;
  if (params.empty()) return true;
  return adam_any_step(params, remainders, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                       references, steps, lr, beta1, beta2, eps, weight_decay, decay,
                       decoupled, amsgrad, maximize, grad_scale, cautious, float32_lr,
                       first_position);
}

}  // namespace decoupled_kernels
