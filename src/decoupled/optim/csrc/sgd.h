// SGD/SGDW: the element loop and its step, for float32 and compensated θ.
//
// A part of the C++ kernel, included by sgd.cpp inside its anonymous namespace, after
// parts.h.

struct SgdScalars {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  DecayScalars decay;
  uint32_t key;  // the remainders' rounding key (compensated θ): (group step, position)
};

// Cautious: decay after the buffer, masked by the sign of the direction d_t the step takes.
// T is θ's storage, as in adam_elements: float, or bfloat16/float16 compensated by the
// remainders `r` (the buffer then float32, as the reference keeps it, _sgd_compensation.py).
template <typename T, Decay D, bool Ref, bool Momentum, bool Fresh, bool Nesterov,
          bool Cautious = false>
void sgd_chunk(T* __restrict p, int8_t* __restrict r, const T* __restrict g,
               float* __restrict buf, const T* __restrict ref, int64_t begin, int64_t end,
               SgdScalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float grad, param = load_weight(p, r, i);
    apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, load(g[i]), ref, i, s.decay);
    if constexpr (Momentum) {
      // b.mul_(μ).add_(g, alpha=1 − τ); g.add(b, alpha=μ); θ.add_(g, alpha=−γ)
      float b = Fresh ? grad : fmadd(s.one_minus_dampening, grad, buf[i] * s.momentum);
      buf[i] = b;
      grad = Nesterov ? fmadd(s.momentum, b, grad) : b;
    }
    if constexpr (Cautious) cautious_decay<Ref>(param, grad, ref, i, s.decay);
    // a compensated θ's remainder: the rehash's high half, as _compensated.store_ (a float32
    // θ does not compute it)
    const uint32_t rehash = mix(mix(static_cast<uint32_t>(i) ^ s.key));
    store_weight(p, r, i, fmadd(s.neg_lr, grad, param), rehash);
  }
}

// θ, g, θ₀ of θ's dtype, the remainders (compensated θ) or nullptr, the float32 buffer.
using SgdChunk = void (*)(void*, int8_t*, const void*, float*, const void*, int64_t, int64_t,
                          SgdScalars);

template <typename T, Decay D, bool Ref, bool Momentum, bool Fresh, bool Nesterov, bool C>
void sgd_chunk_erased(void* p, int8_t* r, const void* g, float* buf, const void* ref,
                      int64_t begin, int64_t end, SgdScalars s) {
  sgd_chunk<T, D, Ref, Momentum, Fresh, Nesterov, C>(
      static_cast<T*>(p), r, static_cast<const T*>(g), buf, static_cast<const T*>(ref), begin,
      end, s);
}

template <typename T, Decay D, bool Ref, bool C>
SgdChunk pick_sgd(bool momentum, bool fresh, bool nesterov) {
  if (!momentum) return sgd_chunk_erased<T, D, Ref, false, false, false, C>;
  if (fresh) {
    return nesterov ? sgd_chunk_erased<T, D, Ref, true, true, true, C>
                    : sgd_chunk_erased<T, D, Ref, true, true, false, C>;
  }
  return nesterov ? sgd_chunk_erased<T, D, Ref, true, false, true, C>
                  : sgd_chunk_erased<T, D, Ref, true, false, false, C>;
}

template <typename T, Decay D, bool C = false>
SgdChunk pick_sgd(bool ref, bool momentum, bool fresh, bool nesterov) {
  return ref ? pick_sgd<T, D, true, C>(momentum, fresh, nesterov)
             : pick_sgd<T, D, false, C>(momentum, fresh, nesterov);
}

template <typename T>
SgdChunk pick_sgd(Decay decay, bool ref, bool momentum, bool fresh, bool nesterov,
                  bool cautious) {
  switch (decay) {
    case Decay::kL2: return pick_sgd<T, Decay::kL2>(ref, momentum, fresh, nesterov);
    case Decay::kDecoupled:
      return cautious ? pick_sgd<T, Decay::kDecoupled, true>(ref, momentum, fresh, nesterov)
                      : pick_sgd<T, Decay::kDecoupled>(ref, momentum, fresh, nesterov);
    default: return pick_sgd<T, Decay::kNone>(ref, momentum, fresh, nesterov);
  }
}

SgdChunk pick_sgd(at::ScalarType param_dtype, Decay decay, bool ref, bool momentum, bool fresh,
                  bool nesterov, bool cautious) {
  switch (param_dtype) {
    case at::kBFloat16:
      return pick_sgd<uint16_t>(decay, ref, momentum, fresh, nesterov, cautious);
    case at::kHalf: return pick_sgd<int16_t>(decay, ref, momentum, fresh, nesterov, cautious);
    default: return pick_sgd<float>(decay, ref, momentum, fresh, nesterov, cautious);
  }
}

// SGD/SGDW over float32 θ (`remainders` empty) or over bfloat16/float16 θ compensated by int8
// `remainders` (sgd_compensated_step_, whose remainders are rounded with bits keyed by the
// group's `step` count and each tensor's position, as the reference's); g and θ₀ in θ's
// dtype, float32 buffers.
// `fresh[t]`: the buffer of tensor t is new (its first step): b ← g, as torch does.
bool sgd_any_step(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                  const Tensors& momentum_buffers, const std::vector<bool>& fresh,
                  const Tensors& references, double lr, double momentum, double dampening,
                  bool nesterov, double weight_decay, double decay, bool decoupled,
                  bool maximize, double grad_scale, bool cautious, double step,
                  int64_t first_position) {
  const size_t n = params.size();
  if (n == 0) return true;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  const bool ref = !references.empty();
  const bool has_momentum = momentum != 0;
  if (!usable_operands(params, remainders, grads, references) ||
      (has_momentum && (!usable_list(momentum_buffers, params, at::kFloat) ||
                        fresh.size() != n))) {
    return false;
  }
  if (compensated && !(std::isfinite(step) && step >= 0)) return false;
  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  std::vector<SgdScalars> scalars(n);
  std::vector<SgdChunk> kernels(n);
  for (size_t t = 0; t < n; ++t) {
    const int64_t position = first_position + static_cast<int64_t>(t);
    scalars[t] = SgdScalars{static_cast<float>(-lr), static_cast<float>(momentum),
                            static_cast<float>(1 - dampening),
                            decay_scalars(weight_decay, decay, maximize),
                            compensated ? rounding_key(step, position) : 0U};
    kernels[t] = pick_sgd(param_dtype, mode, ref, has_momentum, has_momentum && fresh[t],
                          nesterov, cautious);
  }
  for_each_unscaled_chunk(params, grads, grad_scale, [&](int64_t t, void* g, int64_t begin,
                                                         int64_t end) {
    kernels[t](params[t].data_ptr(), compensated ? remainders[t].data_ptr<int8_t>() : nullptr,
               g, has_momentum ? momentum_buffers[t].data_ptr<float>() : nullptr,
               ref ? references[t].data_ptr() : nullptr, begin, end, scalars[t]);
  });
  bump_operands(params, remainders, grads, grad_scale);
  if (has_momentum) bump_versions(momentum_buffers);
  return true;
}
