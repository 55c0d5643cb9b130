// int8 moments: blockwise 8-bit floats decoded, stepped and coded again in one pass.
//
// A part of the C++ kernel, included by int8.cpp inside its anonymous namespace, after
// parts.h.

// Blocks of kInt8Block elements in memory order, one float32 scale each, a power of two s
// (_int8.scales_of); m as int8 codes q, m = sign(q)·L(|q|)·s, v as uint8 codes, v = L(q)·s,
// L(c) the 8-bit float of _int8.py's module docstring: for c >= 8 the float32 whose bit
// pattern is (c + bias)·2²⁰, below it c·T/8. A block is decoded, stepped with the float32
// path's arithmetic (but for sqrt(v̂): _int8.py, Arithmetic), its new m and v kept in stack
// buffers (L1), its new scales taken, and it is coded again with stochastic rounding: one
// pass over θ, g, codes and scales. Coding is integer arithmetic on the float's bit pattern
// (no root, division or table per element), so every loop vectorizes.

constexpr int32_t kInt8Block = 256;
// The step loop's group (below): one AVX-512 vector of float32 θ, else 64 elements (eight
// AVX2 vectors; for compensated θ, whose int8 remainders the loop reads, one AVX-512 vector of
// them). Measured with GCC 12: in cache, a group of one vector was the fastest on AVX-512 (64:
// 2% slower), 64 within 5% of the best on AVX2, and one of exactly two vectors made GCC emit
// a loop 1.7x slower on both; a group of 16 for compensated bfloat16 θ made its step 3x slower
// (gpt2-small, AVX-512 Xeon: 0.31 G params/s against 0.99 with 64).
template <typename T>
constexpr int32_t group_size() {
#if defined(__AVX512F__)
  if (std::is_same_v<T, float>) return 16;
#endif
  return 64;
}
static_assert(kInt8Block % 64 == 0 && kInt8Block % 16 == 0, "a block must hold whole groups");
static_assert(kChunk % kInt8Block == 0, "a chunk must hold whole int8 blocks");

// An 8-bit float of _int8.CODES: `bias` makes a code's bit pattern, `tiny` is the first
// binade's lower end T (the level of code 8), `unit` = T/8 the linear levels' step
struct Int8Code {
  int32_t bias;
  float tiny;
  float unit;
};
constexpr Int8Code kCodeM{896, 0x1p-14f, 0x1p-17f}, kCodeV{768, 0x1p-30f, 0x1p-33f};
constexpr int kFractionShift = 20;  // float32 fraction bits below the code's 3

inline float from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline int32_t to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// _int8.levels: the magnitude of code c >= 0 for a scale of 1 (both computed, one selected:
// a branch would leave the AVX2 loop scalar)
inline float level(int32_t c, Int8Code code) {
  const float linear = static_cast<float>(c) * code.unit;
  const float normal = from_bits((c + code.bias) << kFractionShift);
  return c < 8 ? linear : normal;
}

// _int8.scales_of: the least power of two at or above a block's largest magnitude (2^(E+1) for
// one in (2^E, 2^(E+1)), the largest itself for a normal power of two, 2^-126 for a subnormal
// one, 0 for 0); NaN stays NaN, and ∞ for a largest of 2^126 or more, whose scale's inverse
// would be subnormal (and flushed to 0 where denormals are flushed)
inline float scale_of(float largest) {
  if (largest != largest) return largest;
  const int32_t bits = to_bits(largest);
  if (bits == 0) return 0.0f;
  if (bits >= 0x7E800000) return std::numeric_limits<float>::infinity();  // 2^126 or more
  if ((bits & 0x007FFFFF) == 0 && bits >= 0x00800000) return largest;  // a power of two
  return from_bits((bits & 0x7F800000) + (1 << 23));
}

// The codes of one moment of a block (_int8.encode_'s operations in its order), as int32:
// x = |value|·(1/s) (exact: 1/s is a power of two), x + T below the first binade, then the
// float's bit pattern plus the random bits 16·r + 8 below the code's fraction, cut to the code;
// m keeps its sign. r is the low (m) or high (v) half of the element's hash. The loops use
// 32-bit lanes only, so each vectorizes 16 elements wide (AVX-512) without spilling registers.
template <bool Signed>
inline void int8_codes(int32_t* __restrict q, const float* __restrict value,
                       const uint32_t* __restrict random, int32_t count, float scale,
                       Int8Code code) {
  if (!(scale < std::numeric_limits<float>::infinity())) {  // NaN or ∞: codes 0
    std::fill(q, q + count, 0);
    return;
  }
  const float inverse = scale > 0 ? 1.0f / scale : 1.0f;
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    const uint32_t noise = Signed ? ((random[k] & 0xFFFFU) << 4) | 8U
                                  : ((random[k] >> 12) & 0xFFFF0U) | 8U;
    const float x = std::abs(value[k]) * inverse;
    const bool linear = x < code.tiny;
    const int32_t bits = to_bits(linear ? x + code.tiny : x);
    const int32_t bias = linear ? code.bias + 8 : code.bias;
    const int32_t c = ((bits + static_cast<int32_t>(noise)) >> kFractionShift) - bias;
    q[k] = Signed && value[k] < 0 ? -c : c;
  }
}

// The block's largest magnitude as _int8.encode_ takes it, NaN when any is NaN. A maximum over
// the magnitudes' bit patterns, which order non-negative floats and put every NaN above +inf:
// two operations per element, not four.
inline float block_largest(const float* values, int32_t count) {
  int32_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int32_t k = 0; k < count; ++k) {
    const int32_t bits = to_bits(values[k]) & 0x7FFFFFFF;
    largest = bits > largest ? bits : largest;
  }
  if (largest > 0x7F800000) return std::numeric_limits<float>::quiet_NaN();
  return from_bits(largest);
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
  // The step loop runs over groups of group_size<T>() elements whose codes are first widened
  // to 32 bits in a stack buffer: a loop reading the bytes directly is vectorized 64 elements
  // wide on AVX-512, which spills registers and widens through shuffles (the in-cache step 13%
  // slower on the AVX-512 Xeon). The new codes are written from 32-bit lanes in a last pass,
  // for the same reason.
  alignas(64) int32_t codes_m[kInt8Block];
  alignas(64) int32_t codes_v[kInt8Block];
  alignas(64) float m[kInt8Block];
  alignas(64) float v[kInt8Block];
  alignas(64) uint32_t random[kInt8Block];  // the element's hash, for both codes
  const AdamScalars s = scalars;  // a local copy: stores through p cannot change it
  const float sm = *scale_m, sv = *scale_v;
  constexpr int32_t kGroup = group_size<T>();
  for (int32_t group = 0; group < count; group += kGroup) {
    const int32_t in_group = Full ? kGroup : std::min(kGroup, count - group);
    alignas(64) int32_t old_m[kGroup];
    alignas(64) int32_t old_v[kGroup];
    for (int32_t j = 0; j < in_group; ++j) {
      old_m[j] = qm[group + j];
      old_v[j] = qv[group + j];
    }
#pragma omp simd
    for (int32_t j = 0; j < in_group; ++j) {
      const int32_t k = group + j;
      float grad, param = load_weight(p, r, k);
      apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, load(g[k]), ref, k, s.decay);
      // decode: _int8.decode's operations (exact)
      const int32_t code = old_m[j];
      const float magnitude = level(std::abs(code), kCodeM);
      const float m_old = (code < 0 ? -magnitude : magnitude) * sm;
      const float v_old = level(old_v[j], kCodeV) * sv;
      const float exp_avg = lerp(m_old, grad, s.beta1_weight);
      const float exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, v_old * s.beta2);
      if constexpr (Cautious) cautious_decay<Ref>(param, exp_avg, ref, k, s.decay);
      // sqrt(v̂) as v's root times 1/sqrt(1 − β2ᵗ), not divided by it (_int8.py, Arithmetic)
      const float denom = std::sqrt(exp_avg_sq) * s.inverse_bias_correction2_sqrt + s.eps;
      // the hash is taken once, here, for both codes; a compensated θ's remainder takes the
      // rehash's high half, as with bfloat16 moments (a float32 θ does not compute the rehash)
      const uint32_t hash = mix((first + static_cast<uint32_t>(k)) ^ s.key);
      store_weight(p, r, k, param + s.lr_neg_step_size * exp_avg / denom, mix(hash));
      random[k] = hash;
      m[k] = exp_avg;
      v[k] = exp_avg_sq;
    }
  }
  const float new_sm = scale_of(block_largest(m, count));
  const float new_sv = scale_of(block_largest(v, count));
  int8_codes<true>(codes_m, m, random, count, new_sm, kCodeM);
  int8_codes<false>(codes_v, v, random, count, new_sv, kCodeV);
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    qm[k] = static_cast<int8_t>(codes_m[k]);
    qv[k] = static_cast<uint8_t>(codes_v[k]);
  }
  *scale_m = new_sm;
  *scale_v = new_sv;
}

// Asks for the next block's θ, g and codes while this one computes: the step is bound by its
// arithmetic, and its loads barely overlap it otherwise (one 20M-element tensor, 2 threads,
// AVX-512 Xeon: 10% faster with it, with the step loop in groups; without the groups, 5%).
template <typename T>
inline void prefetch_block(const T* theta, const T* grad, const int8_t* qm, const uint8_t* qv) {
#if defined(__GNUC__)
  constexpr int kLine = 64;
  const char* const weights = reinterpret_cast<const char*>(theta);
  const char* const grads = reinterpret_cast<const char*>(grad);
  for (int offset = 0; offset < kInt8Block * static_cast<int>(sizeof(T)); offset += kLine) {
    __builtin_prefetch(weights + offset, 1);
    __builtin_prefetch(grads + offset, 0);
  }
  for (int offset = 0; offset < kInt8Block; offset += kLine) {
    __builtin_prefetch(qm + offset, 1);
    __builtin_prefetch(qv + offset, 1);
  }
#endif
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
    if (k + kInt8Block < end) {
      prefetch_block(theta + k + kInt8Block, grad + k + kInt8Block, qm + k + kInt8Block,
                     qv + k + kInt8Block);
    }
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
