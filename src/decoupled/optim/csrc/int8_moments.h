// int8 moments: blockwise codes decoded, stepped and coded again in one pass.
//
// A part of kernels.cpp (the one translation unit of the C++ kernel), included there inside
// its anonymous namespace, after tensor_lists.h and the Adam steps.

// Blocks of kInt8Block elements in memory order, one float32 scale each (the block's largest
// |m|, largest v); m as int8 codes q, m = (d_m(|q|)·s)·sign(q), v as uint8 codes,
// v = d_v(q)·s, with d(q) = (q·c)² for m and ((q·c)²)² for v, c = 1/levels in float32
// (_int8.levels). A block is decoded, stepped with the float32 path's arithmetic, its new m
// and v (and sqrt(v), which the step computes anyway) kept in stack buffers (L1), its new
// scales taken, and it is coded again with stochastic rounding: one pass over θ, g, codes and
// scales. Everything is arithmetic on vector lanes (no table lookups, no divisions but the
// step's own two), so that both loops vectorize.

constexpr int32_t kInt8Block = 256;
static_assert(kChunk % kInt8Block == 0, "a chunk must hold whole int8 blocks");

// d(q) of _int8.levels; q may be any int32 (the first guess of a code may be off by one)
template <int Levels, int Power>
inline float level(int32_t q) {
  constexpr float step = static_cast<float>(1.0 / Levels);
  float t = static_cast<float>(q) * step;
  t = t * t;
  return Power == 4 ? t * t : t;
}

// x of _int8.encode_ for a finite magnitude: |value|·(1/s), at most 1, and 1 for |value| >= s
inline float unit_fraction(float magnitude, float safe, float inverse) {
  return magnitude >= safe ? 1.0f : std::min(magnitude * inverse, 1.0f);
}

// _int8.encode_'s code of one element of fraction x in [0, 1]: floor(root·Levels) or one
// above, chosen by comparing x − d(low) with the random threshold's share of the step.
template <int Levels, int Power>
inline int32_t int8_code(float x, float root, uint32_t random16) {
  const int32_t low = std::min(static_cast<int32_t>(root * static_cast<float>(Levels)), Levels);
  const float below = level<Levels, Power>(low), above = level<Levels, Power>(low + 1);
  const float threshold = (static_cast<float>(random16) + 0.5f) / 65536.0f;
  return low + ((x - below) > threshold * (above - below) ? 1 : 0);  // low = Levels: x − 1 <= 0
}

struct BlockScales {
  float safe_m, inverse_m;  // s of m (1 where it is 0 or NaN) and 1/s
  float safe_v, inverse_v, inverse_root_v;  // s of v, 1/s, 1/sqrt(s)
};

// Codes of a block's new m and v (see int8_code) as int32, one loop per moment: with 32-bit
// lanes only, each loop vectorizes 16 elements wide without spilling registers (an int8 store
// in the loop makes GCC process 64 at a time). A block with a NaN (its scale NaN) is all 0,
// without the loops. An infinite scale does reach them (1/s = 0): its infinite elements code
// as the largest level (x = 1, v's fraction ∞·0 clamped to 1), the finite ones as 0.
inline void int8_codes(int32_t* __restrict qm, int32_t* __restrict qv, const float* __restrict m,
                       const float* __restrict v, const float* __restrict root_v,
                       const uint32_t* __restrict random, int32_t count, bool nan_m, bool nan_v,
                       const BlockScales& b) {
  // the scales are read into locals: loads through `b` inside a loop that stores to memory
  // are not hoisted, and leave the loop scalar
  const float safe_m = b.safe_m, inverse_m = b.inverse_m;
  const float safe_v = b.safe_v, inverse_v = b.inverse_v, inverse_root_v = b.inverse_root_v;
  if (nan_m) {
    std::fill(qm, qm + count, 0);
  } else {
#pragma omp simd
    for (int32_t k = 0; k < count; ++k) {
      const uint32_t random16 = random[k] & 0xFFFFU;
      const float x = unit_fraction(std::abs(m[k]), safe_m, inverse_m);
      const int32_t code = int8_code<127, 2>(x, std::sqrt(x), random16);
      qm[k] = m[k] < 0 ? -code : code;
    }
  }
  if (nan_v) {
    std::fill(qv, qv + count, 0);
  } else {
#pragma omp simd
    for (int32_t k = 0; k < count; ++k) {
      const uint32_t random16 = random[k] >> 16;
      const float x = unit_fraction(v[k], safe_v, inverse_v);
      // the fourth root from the step's sqrt(v): (min(sqrt(v)·(1/sqrt(s)), 1))^(1/2), one
      // sqrt, not two; the comparison takes NaN (an infinite v over an infinite scale) to 1.
      // Selecting on the fraction, not on x >= 1, is 12% faster per element (AVX-512 and AVX2)
      const float fraction = root_v[k] * inverse_root_v;
      const float root = std::sqrt(fraction < 1.0f ? fraction : 1.0f);
      qv[k] = int8_code<255, 4>(x, root, random16);
    }
  }
}

// The block's scale as _int8.encode_ takes it: the largest magnitude, NaN when any is NaN.
inline float block_scale(const float* values, int32_t count) {
  float largest = 0.0f;
  int32_t nan = 0;
#pragma omp simd reduction(max : largest) reduction(| : nan)
  for (int32_t k = 0; k < count; ++k) {
    const float magnitude = std::abs(values[k]);
    nan |= magnitude != magnitude;
    largest = magnitude > largest ? magnitude : largest;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : largest;
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
  alignas(64) float v[kInt8Block];
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
    // decode: the reference's (d(|q|)·s)·sign(q) as a negation, the same bits (q = 0 gives
    // d(0)·s = +0, or NaN for an infinite s, either way), without the multiplication
    const float magnitude = level<127, 2>(code < 0 ? -code : code) * sm;
    const float m_old = code < 0 ? -magnitude : magnitude;
    const float v_old = level<255, 4>(code_v) * sv;
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
  const BlockScales scales{safe_m, 1.0f / safe_m, safe_v, 1.0f / safe_v, 1.0f / std::sqrt(safe_v)};
  int8_codes(codes_m, codes_v, m, v, root_v, random, count, new_sm != new_sm, new_sv != new_sv,
             scales);
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
                     bool maximize, double grad_scale, bool cautious, bool float32_lr) {
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
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize, float32_lr);
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
