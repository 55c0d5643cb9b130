// Per-element arithmetic shared by every step: the rounding hash, bfloat16 loads and
// stochastic stores, torch's fused multiply-add and lerp, the decay conventions.
//
// A part of the C++ kernel, included by parts.h inside its anonymous namespace, first.

constexpr int64_t kChunk = 1 << 15;  // elements per work item (128 KiB of float32)

enum class Decay { kNone, kL2, kDecoupled };

// lowbias32, an integer hash by Chris Wellons (hash-prospector); mirrored in _compact.py.
inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint32_t rounding_key(double step, int64_t position) {
  return mix(static_cast<uint32_t>(step) * 0x9E3779B9U ^
             static_cast<uint32_t>(position) * 0x85EBCA6BU);
}

inline float load(float x) { return x; }
inline float load(uint16_t bits) {  // bfloat16 -> float32: the high half of the word
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline float load(int16_t bits);  // float16 -> float32 (the compensated weights' section)

inline void store(float* out, float value, uint32_t) { *out = value; }
// The NaN select is made on 32-bit words, before narrowing: a float32 compare choosing between
// 16-bit values has no single instruction before AVX-512 (mask registers), and GCC then gives
// up on the whole loop ("control flow in loop"), leaving the AVX2 build scalar. It selects the
// input of the addition (0x7FC00000 + random16 keeps 0x7FC0 above), not its result: GCC
// narrows a selected result and the NaN mask separately, two packs instead of one (the AVX2
// bfloat16-state step 6% slower).
inline void store(uint16_t* out, float value, uint32_t random16) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t quiet = value != value ? 0x7FC00000U : word;  // NaN stays NaN
  *out = static_cast<uint16_t>((quiet + random16) >> 16);
}

// a·b + c rounded once, as torch's Vectorized<float>::fmadd (ATen/cpu/vec) where the CPU has
// fused multiply-add instructions, and as its unfused fallback where it has none.
#if defined(__FMA__) || defined(__aarch64__)
inline float fmadd(float a, float b, float c) { return std::fma(a, b, c); }
#else
inline float fmadd(float a, float b, float c) { return a * b + c; }
#endif

// torch's vectorized lerp (ATen/native/Lerp.h, lerp_vec): a + w·(b − a) for |w| < 0.5, else
// b + (w − 1)·(b − a), each with one fused multiply-add. Both are computed and one is selected:
// written as a branch, GCC will not compute the other one speculatively (a float operation
// may trap, -ftrapping-math) and, without AVX-512's masked instructions, leaves the loop
// scalar ("control flow in loop"); a select of two computed values is a vector blend.
inline float lerp(float a, float b, float w) {
  const float low = fmadd(w, b - a, a);
  const float high = fmadd(w - 1.0f, b - a, b);
  return std::abs(w) < 0.5f ? low : high;
}

Decay decay_mode(bool decoupled, double weight_decay, double decay) {
  if (decoupled) return decay != 0 ? Decay::kDecoupled : Decay::kNone;
  return weight_decay != 0 ? Decay::kL2 : Decay::kNone;
}

struct DecayScalars {
  float weight_decay;  // λ (L2)
  float keep;          // 1 − c (decoupled, toward zero)
  float rate;          // c (decoupled, toward a reference)
  float sign;          // −1 to maximize
};

DecayScalars decay_scalars(double weight_decay, double decay, bool maximize) {
  return {static_cast<float>(weight_decay), static_cast<float>(1 - decay),
          static_cast<float>(decay), maximize ? -1.0f : 1.0f};
}

// What every update does first, as the reference loops and decay.py: the gradient (negated to
// maximize), then the one place L2 and decoupled decay differ — L2 adds λ·(θ − θ₀) to the
// gradient, decoupled decay moves θ by c toward θ₀ (θ·(1 − c) toward zero).
template <Decay D, bool Ref, typename R>
inline void apply_decay(float& grad, float& param, float g, const R* ref, int64_t k,
                  const DecayScalars& s) {
  grad = s.sign * g;
  // g.add(θ − θ₀, alpha=λ)
  if constexpr (D == Decay::kL2) {
    grad = fmadd(s.weight_decay, Ref ? param - load(ref[k]) : param, grad);
  }
  if constexpr (D == Decay::kDecoupled) {
    if constexpr (Ref) param = lerp(param, load(ref[k]), s.rate);
    else param = param * s.keep;
  }
}

// Cautious weight decay (Chen, Li, Liang et al., arXiv 2510.12402), as decay.py's
// cautious_mask and apply_cautious_decay_: the decoupled decay of apply_decay, applied only
// where the step's direction u and θ − θ₀ agree in sign (zero agrees, NaN does not). Signs
// are compared rather than the product, which could round to ±0.
template <bool Ref, typename R>
inline void cautious_decay(float& param, float direction, const R* ref, int64_t k,
                           const DecayScalars& s) {
  const float offset = Ref ? param - load(ref[k]) : param;
  // bitwise, not short-circuit: an && or || is a branch, which leaves the AVX2 loop scalar
  const bool agree = ((direction >= 0) & (offset >= 0)) | ((direction <= 0) & (offset <= 0));
  float decayed;
  if constexpr (Ref) decayed = lerp(param, load(ref[k]), s.rate);
  else decayed = param * s.keep;
  param = agree ? decayed : param;
}

struct AdamScalars {
  float lr_neg_step_size;  // −γ/(1 − β1ᵗ)
  float bias_correction2_sqrt;
  float inverse_bias_correction2_sqrt;  // its float32 inverse (int8 moments)
  float beta1_weight;  // 1 − β1 (lerp weight)
  float beta2;
  float one_minus_beta2;
  float eps;
  DecayScalars decay;
  uint32_t key;
};
