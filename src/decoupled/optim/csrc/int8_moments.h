// int8 moments: blockwise codes decoded, stepped and coded again in one pass.
//
// A part of kernels.cpp (the one translation unit of the C++ kernel), included there inside
// its anonymous namespace, after tensor_lists.h and the Adam steps.

// Blocks of kInt8Block elements in memory order, one float32 scale each (the block's largest
// |m|, largest v); m as int8 codes q, m = ((q·|q|)·c_m)·s, v as uint8 codes,
// v = ((q·q·c_v)²)·s, c = 1/levels² in float32 (_int8.py's module docstring). A block is
// decoded, stepped with the float32 path's arithmetic, its new m and v (and sqrt(v), which
// the step computes anyway) kept in stack buffers (L1), its new scales taken, and it is coded
// again with stochastic rounding: one pass over θ, g, codes and scales. Everything is
// arithmetic on vector lanes (no table lookups; no divisions but the step's own two per
// element and one per block for each factor k), so that every loop vectorizes.

constexpr int32_t kInt8Block = 256;
static_assert(kChunk % kInt8Block == 0, "a chunk must hold whole int8 blocks");
constexpr float kTopM = 127.0f * 127.0f, kTopV = 255.0f * 255.0f;  // the largest levels

// _int8.rounded_up: x kept in [FLT_MIN, 2^127], then the next float above it
inline float rounded_up(float x) {
  x = std::min(std::max(x, std::numeric_limits<float>::min()), 0x1p127f);
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  ++bits;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// min(a, b) of non-negative floats (never NaN here) as the integer minimum of their bit
// patterns, which order them alike: GCC turns a float minimum that feeds a root into a
// compare, two blends and a masked conversion; this is one instruction (the int8 step 9%
// faster per element, AVX-512 and AVX2)
inline float smaller(float a, float b) {
  int32_t x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  x = x < y ? x : y;
  std::memcpy(&a, &x, sizeof a);
  return a;
}

// _int8.encode_'s random threshold t in (0, 1)
inline float threshold(uint32_t random16) {
  return (static_cast<float>(random16) + 0.5f) * (1.0f / 65536.0f);
}

// Codes of a block's new m and v (_int8.encode_'s operations in its order) as int32, one loop
// per moment: with 32-bit lanes only, each loop vectorizes 16 elements wide without spilling
// registers (an int8 store in the loop makes GCC process 64 at a time; one loop for both
// codes is 5% slower). A block with a NaN (its scale NaN) is all 0, without the loops. The
// factors k are finite and nonzero, so y and f are never NaN: an infinite element reaches the
// largest level, a finite one beside it 0 (m above about 1e33: 1 or 2).
inline void int8_codes(int32_t* __restrict qm, int32_t* __restrict qv, const float* __restrict m,
                       const float* __restrict root_v, const uint32_t* __restrict random,
                       int32_t count, bool nan_m, bool nan_v, float k_m, float k_v) {
  if (nan_m) {
    std::fill(qm, qm + count, 0);
  } else {
#pragma omp simd
    for (int32_t k = 0; k < count; ++k) {
      const float y = smaller(std::abs(m[k]) * k_m, kTopM);
      const int32_t low = static_cast<int32_t>(std::sqrt(y));
      const float below = static_cast<float>(low);
      const float gap = y - below * below;
      const float step = below + below + 1.0f;
      const int32_t code = low + (gap > threshold(random[k] & 0xFFFFU) * step ? 1 : 0);
      qm[k] = m[k] < 0 ? -code : code;
    }
  }
  if (nan_v) {
    std::fill(qv, qv + count, 0);
  } else {
#pragma omp simd
    for (int32_t k = 0; k < count; ++k) {
      const float f = smaller(root_v[k] * k_v, kTopV);
      const int32_t low = static_cast<int32_t>(std::sqrt(f));
      const float below = static_cast<float>(low);
      const float square = below * below, odd = below + below + 1.0f;
      const float gap = (f - square) * (f + square);  // f² − q⁴
      const float step = odd * ((square + square) + odd);  // (q + 1)⁴ − q⁴
      qv[k] = low + (gap > threshold(random[k] >> 16) * step ? 1 : 0);
    }
  }
}

// The block's scale as _int8.encode_ takes it: the largest magnitude, NaN when any is NaN. A
// maximum over the magnitudes' bit patterns, which order non-negative floats and put every
// NaN above +inf: two operations per element, not four.
inline float block_scale(const float* values, int32_t count) {
  int32_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int32_t k = 0; k < count; ++k) {
    int32_t bits;
    std::memcpy(&bits, values + k, sizeof bits);
    bits &= 0x7FFFFFFF;
    largest = bits > largest ? bits : largest;
  }
  if (largest > 0x7F800000) return std::numeric_limits<float>::quiet_NaN();
  float scale;
  std::memcpy(&scale, &largest, sizeof scale);
  return scale;
}

// One block of `count` <= kInt8Block elements starting at element `first` of its tensor (the
// pointers already point there); `scale_m`, `scale_v` point at the block's scales. T is θ's
// storage, as in adam_elements: float, or bfloat16/float16 compensated by the remainders `r`.
// Cautious: decay after m_t, masked by its sign, as adam_elements. Full: a whole block, whose
// count the compiler knows (no remainder iterations in the loops: 7-9% faster per element).
template <typename T, Decay D, bool Ref, bool Cautious, bool Full>
void adam_int8_block(T* __restrict p, int8_t* __restrict r, const T* __restrict g,
                     int8_t* __restrict qm, uint8_t* __restrict qv, float* scale_m,
                     float* scale_v, const T* __restrict ref, uint32_t first,
                     int32_t partial_count, const AdamScalars& scalars) {
  const int32_t count = Full ? kInt8Block : partial_count;
  // every loop runs on 32-bit lanes (codes widened first, narrowed last): a byte load or store
  // in a loop makes GCC process 64 elements at a time, which spills registers
  alignas(64) int32_t codes_m[kInt8Block];
  alignas(64) int32_t codes_v[kInt8Block];
  alignas(64) float m[kInt8Block];
  alignas(64) float v[kInt8Block];  // for its block scale
  alignas(64) float root_v[kInt8Block];
  alignas(64) uint32_t random[kInt8Block];  // the element's hash, for both codes
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    codes_m[k] = qm[k];
    codes_v[k] = qv[k];
  }
  const AdamScalars s = scalars;  // a local copy: stores through p cannot change it
  const float sm = *scale_m, sv = *scale_v;
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    float grad, param = load_weight(p, r, k);
    apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, load(g[k]), ref, k, s.decay);
    const int32_t code = codes_m[k];
    const int32_t code_v = codes_v[k];
    // decode: _int8.decode's operations (q·|q| and q·q are exact)
    const float q_m = static_cast<float>(code), q_v = static_cast<float>(code_v);
    const float m_old = ((q_m * std::abs(q_m)) * (1.0f / kTopM)) * sm;
    const float v_unit = (q_v * q_v) * (1.0f / kTopV);
    const float v_old = (v_unit * v_unit) * sv;
    const float exp_avg = lerp(m_old, grad, s.beta1_weight);
    const float exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, v_old * s.beta2);
    if constexpr (Cautious) cautious_decay<Ref>(param, exp_avg, ref, k, s.decay);
    const float root = std::sqrt(exp_avg_sq);
    const float denom = root / s.bias_correction2_sqrt + s.eps;
    // the hash is taken once, here, for both codes (each coding loop hashing on its own is
    // 7% slower per element); a compensated θ's remainder takes the rehash's high half, as
    // with bfloat16 moments (a float32 θ does not compute the rehash)
    const uint32_t hash = mix((first + static_cast<uint32_t>(k)) ^ s.key);
    store_weight(p, r, k, param + s.lr_neg_step_size * exp_avg / denom, mix(hash));
    random[k] = hash;
    m[k] = exp_avg;
    v[k] = exp_avg_sq;
    root_v[k] = root;
  }
  const float new_sm = block_scale(m, count), new_sv = block_scale(v, count);
  const float safe_m = new_sm > 0 ? new_sm : 1.0f, safe_v = new_sv > 0 ? new_sv : 1.0f;
  int8_codes(codes_m, codes_v, m, root_v, random, count, new_sm != new_sm, new_sv != new_sv,
             rounded_up(kTopM / safe_m), rounded_up(kTopV / std::sqrt(safe_v)));
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    qm[k] = static_cast<int8_t>(codes_m[k]);
    qv[k] = static_cast<uint8_t>(codes_v[k]);
  }
  *scale_m = new_sm;
  *scale_v = new_sv;
}

// θ, g, θ₀ of θ's dtype, the remainders (compensated θ) or nullptr, codes and scales.
using Int8Chunk = void (*)(void*, int8_t*, const void*, int8_t*, uint8_t*, float*, float*,
                           const void*, int64_t, int64_t, const AdamScalars&);

// The elements [begin, end) of a tensor, begin a multiple of kInt8Block (for_each_chunk's).
template <typename T, Decay D, bool Ref, bool Cautious>
void adam_int8_chunk(void* p, int8_t* r, const void* g, int8_t* qm, uint8_t* qv, float* scale_m,
                     float* scale_v, const void* ref, int64_t begin, int64_t end,
                     const AdamScalars& s) {
  T* const theta = static_cast<T*>(p);
  const T* const grad = static_cast<const T*>(g);
  const T* const init = static_cast<const T*>(ref);
  for (int64_t k = begin; k < end; k += kInt8Block) {
    const int64_t block = k / kInt8Block;
    const int32_t count = static_cast<int32_t>(std::min<int64_t>(kInt8Block, end - k));
    const auto block_step = count == kInt8Block ? adam_int8_block<T, D, Ref, Cautious, true>
                                                : adam_int8_block<T, D, Ref, Cautious, false>;
    block_step(theta + k, r ? r + k : nullptr, grad + k, qm + k, qv + k, scale_m + block,
               scale_v + block, Ref ? init + k : nullptr, static_cast<uint32_t>(k), count, s);
  }
}

template <typename T, Decay D, bool Cautious = false>
Int8Chunk pick_adam_int8(bool ref) {
  return ref ? adam_int8_chunk<T, D, true, Cautious> : adam_int8_chunk<T, D, false, Cautious>;
}

template <typename T>
Int8Chunk pick_adam_int8(Decay decay, bool ref, bool cautious) {
  switch (decay) {
    case Decay::kL2: return pick_adam_int8<T, Decay::kL2>(ref);
    case Decay::kDecoupled:
      return cautious ? pick_adam_int8<T, Decay::kDecoupled, true>(ref)
                      : pick_adam_int8<T, Decay::kDecoupled>(ref);
    default: return pick_adam_int8<T, Decay::kNone>(ref);
  }
}

Int8Chunk pick_adam_int8(at::ScalarType param_dtype, Decay decay, bool ref, bool cautious) {
  switch (param_dtype) {
    case at::kBFloat16: return pick_adam_int8<uint16_t>(decay, ref, cautious);
    case at::kHalf: return pick_adam_int8<int16_t>(decay, ref, cautious);
    default: return pick_adam_int8<float>(decay, ref, cautious);
  }
}

bool usable_scales(const Tensors& scales, at::TensorList params) {
  if (scales.size() != params.size()) return false;
  for (size_t t = 0; t < scales.size(); ++t) {
    const auto& s = scales[t];
    const int64_t blocks = (params[t].numel() + kInt8Block - 1) / kInt8Block;
    if (!s.defined() || !s.device().is_cpu() || s.scalar_type() != at::kFloat ||
        !s.is_contiguous() || s.dim() != 1 || s.numel() != blocks || s.is_inference()) {
      return false;
    }
  }
  return true;
}

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
  if (!usable_weights(params, remainders) || !usable_list(grads, params, param_dtype) ||
      !usable_list(exp_avgs, params, at::kChar) || !usable_list(exp_avg_sqs, params, at::kByte) ||
      !usable_scales(exp_avg_scales, params) || !usable_scales(exp_avg_sq_scales, params) ||
      (ref && !usable_list(references, params, param_dtype)) || steps.size() != n ||
      !disjoint(params)) {
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
  for (at::TensorList written :
       {params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps}) {
    bump_versions(written);
  }
  if (compensated) bump_versions(remainders);
  if (grad_scale != 1.0) bump_versions(grads);
  return true;
}
