// Running over lists of tensors: checks before anything is written, the chunks of all
// tensors shared among threads, the loss scale, step counts and their scalars.
//
// A part of the C++ kernel, included by parts.h inside its anonymous namespace, after
// compensated.h.

bool usable(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype) {
  // dense (contiguous or any permutation, e.g. channels_last) and laid out like the parameter
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided &&
         t.scalar_type() == dtype && t.is_non_overlapping_and_dense() &&
         t.sizes().equals(like.sizes()) && t.strides().equals(like.strides()) &&
         !t.is_conj() && !t.is_neg() && !t.is_inference();
}

// Two parameters sharing memory (the same tensor listed twice, or views of one storage)
// would be updated by two threads at once: such lists are refused.
bool disjoint(at::TensorList params) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(params.size());
  for (const auto& p : params) {
    const auto start = reinterpret_cast<uintptr_t>(p.data_ptr());
    spans.emplace_back(start, start + p.numel() * p.element_size());
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

// What torch's in-place operations do, so autograd still notices a parameter changed
// between a forward pass and its backward ("modified by an inplace operation").
void bump_versions(at::TensorList tensors) {
  for (const auto& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

bool usable_list(at::TensorList list, at::TensorList params, at::ScalarType dtype) {
  if (list.size() != params.size()) return false;
  for (size_t i = 0; i < list.size(); ++i) {
    if (!usable(list[i], params[i], dtype)) return false;
  }
  return true;
}

// θ, and for compensated θ its remainders: float32 θ without remainders, or bfloat16/float16 θ
// (one dtype for the list) with an int8 remainder each, all dense and laid out alike. The
// list is not empty.
bool usable_weights(const Tensors& params, const Tensors& remainders) {
  const auto dtype = params[0].scalar_type();
  if (remainders.empty()) return dtype == at::kFloat && usable_list(params, params, dtype);
  return remainders.size() == params.size() && (dtype == at::kBFloat16 || dtype == at::kHalf) &&
         usable_list(params, params, dtype) && usable_list(remainders, params, at::kChar);
}

// What every step reads beside its state: θ with its remainders (usable_weights), g and θ₀
// (none where `references` is empty) of θ's dtype, and θ's tensors disjoint. The list is not
// empty.
bool usable_operands(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                     const Tensors& references) {
  const auto dtype = params[0].scalar_type();
  return usable_weights(params, remainders) && usable_list(grads, params, dtype) &&
         (references.empty() || usable_list(references, params, dtype)) && disjoint(params);
}

// What every step writes beside its state: θ, its remainders, and g where it was unscaled in
// place (a loss scale other than 1).
void bump_operands(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                   double grad_scale) {
  bump_versions(params);
  bump_versions(remainders);  // empty for float32 θ
  if (grad_scale != 1.0) bump_versions(grads);
}

// Calls update(t, begin, end) for every chunk of every tensor, the chunks of all tensors
// shared among the threads of one parallel region. Each thread takes a run of consecutive
// chunks holding an equal share of the elements (to within a chunk), not an equal number of
// chunks: ResNet-50's list, many small tensors then a few large ones, otherwise gave one of
// two threads 10% more elements than the other, which then stepped alone at the end.
template <typename Update>
void for_each_chunk(at::TensorList params, const Update& update) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (tensor, first element) of each chunk
  std::vector<int64_t> offsets;  // each chunk's first element, counted across all tensors
  int64_t total = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    for (int64_t begin = 0; begin < params[t].numel(); begin += kChunk) {
      work.emplace_back(static_cast<int64_t>(t), begin);
      offsets.push_back(total + begin);
    }
    total += params[t].numel();
  }
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), work.size());
  // the first chunk whose first element lies in share s or later: offset >= s·total/shares
  const auto first_chunk = [&](int64_t share) {
    const int64_t bound = share * total / shares;
    return std::lower_bound(offsets.begin(), offsets.end(), bound) - offsets.begin();
  };
  at::parallel_for(0, shares, 1, [&](int64_t first_share, int64_t last_share) {
    const int64_t last = first_chunk(last_share);  // one search, not one per chunk
    for (int64_t w = first_chunk(first_share); w < last; ++w) {
      const auto [t, begin] = work[w];
      update(t, begin, std::min(begin + kChunk, params[t].numel()));
    }
  });
}

// GradScaler's protocol (torch's fused kernels take grad_scale the same way): the gradient
// is divided by the loss scale and written back, g ← g / scale, as torch's fused Adam does. It
// runs on the chunk the update reads next, so the gradients are still in cache; 1 means none.
// A bfloat16/float16 g is divided in float32 and rounded to nearest (torch's div_).
template <typename G>
inline void unscale(G* __restrict g, int64_t begin, int64_t end, double grad_scale) {
  if (grad_scale == 1.0) return;
  const float scale = static_cast<float>(grad_scale);
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) g[k] = narrow(G{}, load(g[k]) / scale);
}

// unscale for a gradient of θ's dtype: float32, bfloat16 or float16 words
inline void unscale(at::ScalarType dtype, void* g, int64_t begin, int64_t end, double grad_scale) {
  switch (dtype) {
    case at::kBFloat16: unscale(static_cast<uint16_t*>(g), begin, end, grad_scale); break;
    case at::kHalf: unscale(static_cast<int16_t*>(g), begin, end, grad_scale); break;
    default: unscale(static_cast<float*>(g), begin, end, grad_scale);
  }
}

// for_each_chunk, each gradient chunk unscaled just before update(t, g, begin, end) reads it
// (g: tensor t's gradient words, of θ's dtype).
template <typename Update>
void for_each_unscaled_chunk(at::TensorList params, const Tensors& grads, double grad_scale,
                             const Update& update) {
  const auto dtype = params[0].scalar_type();
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    void* g = grads[t].data_ptr();
    unscale(dtype, g, begin, end, grad_scale);
    update(t, g, begin, end);
  });
}

// Every step count a CPU float32 scalar, finite and >= 0. A negative or non-finite count
// would make 1 − β1ᵗ zero or NaN and write NaN into θ; the reference loop raises there
// (ZeroDivisionError, as torch's loop does).
bool usable_steps(const Tensors& steps) {
  for (const auto& step : steps) {
    if (!step.device().is_cpu() || step.scalar_type() != at::kFloat || step.numel() != 1 ||
        step.is_inference()) {
      return false;
    }
    const float count = *step.data_ptr<float>();
    if (!std::isfinite(count) || count < 0) return false;
  }
  return true;
}

// Adds 1 to every step count and returns each tensor's scalars for this step: the bias
// corrections of its count, and its rounding key (count, position), the position of list
// entry t being first_position + t (the optimizer numbers its tensors across all groups, so
// that no two of its tensors share rounding bits at a step). The step size γ/(1 − β1ᵗ)
// is rounded once from double, as the reference loop computes it for a Python float lr; for
// a tensor lr (`float32_lr`) it divides float32 by float32, as torch's `lr / bias_correction1`.
std::vector<AdamScalars> advance_steps(const Tensors& steps, double lr, double beta1,
                                       double beta2, double eps, double weight_decay,
                                       double decay, bool maximize, bool float32_lr,
                                       int64_t first_position) {
  std::vector<AdamScalars> scalars(steps.size());
  double previous_count = -1;  // tensors of a group usually share their step count
  for (size_t t = 0; t < steps.size(); ++t) {
    float* step = steps[t].data_ptr<float>();
    *step += 1.0f;
    const double count = *step;
    if (count != previous_count) {
      const double bias_correction1 = 1 - std::pow(beta1, count);
      const double bias_correction2_sqrt = std::pow(1 - std::pow(beta2, count), 0.5);
      scalars[t] = AdamScalars{
          float32_lr ? -(static_cast<float>(lr) / static_cast<float>(bias_correction1))
                     : static_cast<float>(-(lr / bias_correction1)),
          static_cast<float>(bias_correction2_sqrt),
          static_cast<float>(1 / bias_correction2_sqrt),
          static_cast<float>(1 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1 - beta2),
          static_cast<float>(eps),
          decay_scalars(weight_decay, decay, maximize),
          0,
      };
      previous_count = count;
    } else {
      scalars[t] = scalars[t - 1];
    }
    scalars[t].key = rounding_key(count, first_position + static_cast<int64_t>(t));
  }
  return scalars;
}
