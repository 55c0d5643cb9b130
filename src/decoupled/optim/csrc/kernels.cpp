// One-pass CPU steps for Adam/AdamW and SGD/SGDW over a whole list of tensors.
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
// come from a hash of (element index, tensor position, step), mirrored in Python by
// decoupled/optim/_compact.py, so the reference path and this kernel round alike.
//
// Each op checks every tensor before touching any and returns false (changing nothing) when
// a tensor is not a dense CPU tensor of the expected dtype (float32; bfloat16/float16 θ, g and
// θ₀ with int8 remainders for compensated weights) laid out like its parameter, or a step
// count is negative or not finite: the caller then takes the reference path.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item (128 KiB of float32)

using Tensors = std::vector<at::Tensor>;  // what pybind11 makes of a Python list of tensors

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
// up on the whole loop ("control flow in loop"), leaving the AVX2 build scalar.
inline void store(uint16_t* out, float value, uint32_t random16) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t rounded = value != value ? 0x7FC00000U : word + random16;  // NaN stays NaN
  *out = static_cast<uint16_t>(rounded >> 16);
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
  const bool agree = (direction >= 0 && offset >= 0) || (direction <= 0 && offset <= 0);
  float decayed;
  if constexpr (Ref) decayed = lerp(param, load(ref[k]), s.rate);
  else decayed = param * s.keep;
  param = agree ? decayed : param;
}

struct AdamScalars {
  float lr_neg_step_size;  // −γ/(1 − β1ᵗ)
  float bias_correction2_sqrt;
  float beta1_weight;  // 1 − β1 (lerp weight)
  float beta2;
  float one_minus_beta2;
  float eps;
  DecayScalars decay;
  uint32_t key;
};

// ---- Compensated bfloat16/float16 weights (decoupled/optim/_compensated.py) ---------------
// θ kept in bfloat16 (its words as uint16_t) or float16 (its words as int16_t: a type of its own
// for overloads, where c10::Half's struct copies keep loops scalar) with a signed byte r per
// element: the float32 master weight w = θ + r·ulp(θ)/256 is what a step reads and computes
// on, as a float32 θ; it is written back as θ = round-to-nearest-even(w) and
// r = floor((w − θ)/(ulp(θ)/256) + (bits + 0.5)/2¹⁶) clamped to [−128, 127] (0 where w is not
// finite), the stochastic rounding of _compensated.store_ with the high 16 bits of a rehash of
// the element's hash (bfloat16 moments use the hash itself, amsgrad's maximum the low half of
// the rehash). ulp(θ)/256 = 2^(e − p − 8), θ = m·2^e with m in [0.5, 1), p = 8 (bfloat16) or
// 11 (float16), e clamped below at the smallest normal's (zero and subnormals share it): a
// power of two built from θ's exponent field, the value torch.ldexp gives _compensated._unit.
// Its products with r and divisions by it are exact, so w and r are the reference's bit for
// bit. load_master and store_master are the whole difference from a float32 θ.

// float16 <-> float32 as IEEE converts (exact widening; narrowing rounded to nearest even, as
// torch's conversions), written with integer operations and selects so that the loops
// vectorize: c10's helpers are scalar F16C calls on x86, and GCC vectorizes _Float16
// conversions only with AVX-512 FP16.
inline float bits_to_float(uint32_t word) {
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

__attribute__((always_inline)) inline float load(int16_t x) {
  const uint32_t bits = static_cast<uint16_t>(x), magnitude = bits & 0x7FFFU;
  const uint32_t field = magnitude >> 10;
  // normal: rebias the exponent (15 -> 127, +112); infinity/NaN: all ones (another +112)
  const uint32_t word = (magnitude << 13) + ((field == 0x1FU ? 224U : 112U) << 23);
  const float subnormal = static_cast<float>(magnitude) * 0x1p-24f;  // exact: m·2⁻²⁴
  const float value = field == 0 ? subnormal : bits_to_float(word);
  uint32_t out;
  std::memcpy(&out, &value, sizeof out);
  return bits_to_float(out | ((bits & 0x8000U) << 16));
}

// float32 -> θ's dtype, rounded to nearest even, as torch's conversions (copy_, .to()).
inline float narrow(float, float value) { return value; }
inline uint16_t narrow(uint16_t, float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t rounded = (word + 0x7FFFU + ((word >> 16) & 1U)) >> 16;
  return static_cast<uint16_t>(value != value ? 0x7FC0U : rounded);
}
__attribute__((always_inline)) inline int16_t narrow(int16_t, float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t magnitude = word & 0x7FFFFFFFU;
  // normal float16 (|x| >= 2⁻¹⁴): rebias, round the 13 dropped bits to nearest even; a carry
  // may reach the exponent, and from 65520 up the result is infinity
  const uint32_t normal =
      std::min((magnitude - 0x38000000U + 0xFFFU + ((magnitude >> 13) & 1U)) >> 13, 0x7C00U);
  // below 2⁻¹⁴: the float32 sum |x| + 0.5 rounds |x| to a multiple of 2⁻²⁴ (nearest even),
  // the float16 subnormal spacing, and its low bits count them
  uint32_t sum;
  const float shifted = bits_to_float(magnitude) + 0.5f;
  std::memcpy(&sum, &shifted, sizeof sum);
  const uint32_t small = sum - 0x3F000000U;
  const uint32_t rounded = magnitude > 0x7F800000U   ? 0x7E00U  // NaN
                           : magnitude >= 0x38800000U ? normal
                                                      : small;
  return static_cast<int16_t>(rounded | ((word >> 16) & 0x8000U));
}

template <typename T>
struct Compensated;  // θ's format: exponent field position and width, bias, precision p
template <>
struct Compensated<uint16_t> {
  static constexpr int kMantissa = 7, kExponentMask = 0xFF, kBias = 127;
  static uint32_t bits(uint16_t theta) { return theta; }
};
template <>
struct Compensated<int16_t> {
  static constexpr int kMantissa = 10, kExponentMask = 0x1F, kBias = 15;
  static uint32_t bits(int16_t theta) { return static_cast<uint16_t>(theta); }
};

// ulp(θ)/256 = 2^n in float32 (the section's header): n = e − p − 8 with e = E − bias + 1 for
// θ's biased exponent E (at least 1), from −141 (bfloat16 θ below 2⁻¹²⁶) to 113.
template <typename T>
inline int32_t unit_exponent(T theta) {
  using F = Compensated<T>;
  const int32_t field = static_cast<int32_t>((F::bits(theta) >> F::kMantissa) & F::kExponentMask);
  return std::max(field, 1) - F::kBias + 1 - (F::kMantissa + 1) - 8;
}

// 2^n for n in [−126, 127] (a normal float32)
inline float normal_power(int32_t n) {
  const uint32_t word = static_cast<uint32_t>(n + 127) << 23;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// 2^n, a float32 subnormal below 2⁻¹²⁶ (bfloat16 θ under 2⁻¹¹⁰). The shifts are clamped so
// that the arm a select discards is defined too.
template <typename T>
inline float remainder_unit(T theta) {
  const int32_t n = unit_exponent(theta);
  const uint32_t normal = static_cast<uint32_t>(std::max(n + 127, 0)) << 23;
  const uint32_t subnormal = 1U << std::min(std::max(n + 149, 0), 31);
  const uint32_t word = n >= -126 ? normal : subnormal;
  float unit;
  std::memcpy(&unit, &word, sizeof unit);
  return unit;
}

// x / 2^n, as torch divides by the unit, computed as x·2^a·2^b with a + b = −n: a product by a
// power of two is exact unless it leaves the normal range, and here x·2^a lies between x
// (a multiple of θ's float32 spacing, at least 2⁻⁸ units) and the quotient (at most a few
// hundred units), so both products are exact and equal the (exact) quotient. One reciprocal
// 2⁻ⁿ would overflow for n < −127; a vector division costs several multiplications.
inline float divide_by_power(float x, int32_t n) {
  const int32_t a = (-n) >> 1;  // floor(−n/2): a and −n − a in [−57, 71]
  return (x * normal_power(a)) * normal_power(-n - a);
}

// w = θ + r·ulp(θ)/256 (torch: theta.float() + remainder.float() * unit; not fused)
template <typename T>
__attribute__((always_inline)) inline float load_master(const T* theta, const int8_t* remainder,
                                                        int64_t k) {
  return load(theta[k]) + static_cast<float>(remainder[k]) * remainder_unit(theta[k]);
}

// θ ← round-to-nearest(w), r ← what was lost in units of the new θ's ulp/256, rounded
// stochastically with `random16` (uniform in [0, 2¹⁶)); r = 0 where w is NaN or infinite.
template <typename T>
__attribute__((always_inline)) inline void store_master(T* theta, int8_t* remainder, int64_t k,
                                                        float weight, uint32_t random16) {
  const T rounded = narrow(T{}, weight);
  theta[k] = rounded;
  const float offset = (static_cast<float>(random16) + 0.5f) / 65536.0f;
  const float units =
      std::floor(divide_by_power(weight - load(rounded), unit_exponent(rounded)) + offset);
  const float clamped = std::min(std::max(units, -128.0f), 127.0f);
  const bool finite = std::abs(weight) <= std::numeric_limits<float>::max();
  remainder[k] = static_cast<int8_t>(finite ? clamped : 0.0f);
}

// The weight as the Adam element loop reads and writes it: a float32 θ itself, a compensated
// one through its master weight (`rehash`: the element's second hash, mix(random)). Always
// inlined: a call left in the element loop keeps it scalar.
inline float load_weight(const float* theta, const int8_t*, int64_t k) { return theta[k]; }
template <typename T>
__attribute__((always_inline)) inline float load_weight(const T* theta, const int8_t* remainder,
                                                        int64_t k) {
  return load_master(theta, remainder, k);
}
inline void store_weight(float* theta, int8_t*, int64_t k, float weight, uint32_t) {
  theta[k] = weight;
}
template <typename T>
__attribute__((always_inline)) inline void store_weight(T* theta, int8_t* remainder, int64_t k,
                                                        float weight, uint32_t rehash) {
  store_master(theta, remainder, k, weight, rehash >> 16);
}

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
  const auto elements = [&](int32_t k, int32_t n) {
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

// Calls update(t, begin, end) for every chunk of every tensor, the chunks of all tensors
// shared among the threads of one parallel region.
template <typename Update>
void for_each_chunk(at::TensorList params, const Update& update) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (tensor, first element) of each chunk
  for (size_t t = 0; t < params.size(); ++t) {
    for (int64_t begin = 0; begin < params[t].numel(); begin += kChunk) {
      work.emplace_back(static_cast<int64_t>(t), begin);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
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
// corrections of its count, and its rounding key (count, position).
std::vector<AdamScalars> advance_steps(const Tensors& steps, double lr, double beta1,
                                       double beta2, double eps, double weight_decay,
                                       double decay, bool maximize) {
  std::vector<AdamScalars> scalars(steps.size());
  double previous_count = -1;  // tensors of a group usually share their step count
  for (size_t t = 0; t < steps.size(); ++t) {
    float* step = steps[t].data_ptr<float>();
    *step += 1.0f;
    const double count = *step;
    if (count != previous_count) {
      const double bias_correction1 = 1 - std::pow(beta1, count);
      const double bias_correction2 = 1 - std::pow(beta2, count);
      scalars[t] = AdamScalars{
          static_cast<float>(-(lr / bias_correction1)),
          static_cast<float>(std::pow(bias_correction2, 0.5)),
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
    scalars[t].key = rounding_key(count, static_cast<int64_t>(t));
  }
  return scalars;
}

// Adam/AdamW over float32 θ (`remainders` empty), or over bfloat16/float16 θ compensated by
// int8 `remainders` (adam_compensated_step_); g and θ₀ in θ's dtype, float32 or bfloat16
// moments.
bool adam_any_step(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                   const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                   const Tensors& max_exp_avg_sqs, const Tensors& references,
                   const Tensors& steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double decay, bool decoupled, bool amsgrad,
                   bool maximize, double grad_scale, bool cautious) {
  const size_t n = params.size();
  if (n == 0) return true;
  if (exp_avgs.size() != n) return false;
  const auto state_dtype = exp_avgs[0].scalar_type();
  if (state_dtype != at::kFloat && state_dtype != at::kBFloat16) return false;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  if (compensated ? param_dtype != at::kBFloat16 && param_dtype != at::kHalf
                  : param_dtype != at::kFloat) {
    return false;
  }
  const bool ref = !references.empty();
  if (!usable_list(params, params, param_dtype) || !usable_list(grads, params, param_dtype) ||
      (compensated && !usable_list(remainders, params, at::kChar)) ||
      !usable_list(exp_avgs, params, state_dtype) ||
      !usable_list(exp_avg_sqs, params, state_dtype) ||
      (amsgrad && !usable_list(max_exp_avg_sqs, params, state_dtype)) ||
      (ref && !usable_list(references, params, param_dtype)) || steps.size() != n ||
      !disjoint(params)) {
    return false;
  }
  if (!usable_steps(steps)) return false;

  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  const AdamChunk chunk =
      pick_adam(param_dtype, state_dtype == at::kBFloat16, amsgrad, mode, ref, cautious);

  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize);
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    void* g = grads[t].data_ptr();
    unscale(param_dtype, g, begin, end, grad_scale);
    chunk(params[t].data_ptr(), compensated ? remainders[t].data_ptr<int8_t>() : nullptr, g,
          exp_avgs[t].data_ptr(), exp_avg_sqs[t].data_ptr(),
          amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr,
          ref ? references[t].data_ptr() : nullptr, begin, end, scalars[t]);
  });
  for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps}) bump_versions(written);
  if (compensated) bump_versions(remainders);
  if (grad_scale != 1.0) bump_versions(grads);
  if (amsgrad) bump_versions(max_exp_avg_sqs);
  return true;
}

bool adam_step_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                const Tensors& references, const Tensors& steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, double decay, bool decoupled,
                bool amsgrad, bool maximize, double grad_scale, bool cautious) {
  return adam_any_step(params, {}, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references,
                       steps, lr, beta1, beta2, eps, weight_decay, decay, decoupled, amsgrad,
                       maximize, grad_scale, cautious);
}

// Compensated bfloat16/float16 θ (the section "Compensated ... weights" above): adam_step_'s
// arguments with each parameter's int8 remainder; θ, g and θ₀ share θ's dtype.
bool adam_compensated_step_(const Tensors& params, const Tensors& remainders,
                            const Tensors& grads, const Tensors& exp_avgs,
                            const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                            const Tensors& references, const Tensors& steps, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            double decay, bool decoupled, bool amsgrad, bool maximize,
                            double grad_scale, bool cautious) {
  if (remainders.size() != params.size()) return false;
  if (params.empty()) return true;
  return adam_any_step(params, remainders, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                       references, steps, lr, beta1, beta2, eps, weight_decay, decay,
                       decoupled, amsgrad, maximize, grad_scale, cautious);
}

// ---- int8 moments (decoupled/optim/_int8.py) ----------------------------------------------
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
// so that the loops see finite values only.
inline void int8_codes(int32_t* __restrict qm, int32_t* __restrict qv, const float* __restrict m,
                       const float* __restrict v, const float* __restrict root_v, uint32_t first,
                       int32_t count, uint32_t key, bool nan_m, bool nan_v,
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
      const uint32_t random16 = mix((first + static_cast<uint32_t>(k)) ^ key) & 0xFFFFU;
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
      const uint32_t random16 = mix((first + static_cast<uint32_t>(k)) ^ key) >> 16;
      const float x = unit_fraction(v[k], safe_v, inverse_v);
      // the fourth root from the step's sqrt(v): (sqrt(v)·(1/sqrt(s)))^(1/2), one sqrt, not two
      const float root = std::sqrt(root_v[k] * inverse_root_v);
      qv[k] = int8_code<255, 4>(x, x >= 1.0f ? 1.0f : root, random16);
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
template <typename T, Decay D, bool Ref>
void adam_int8_block(T* __restrict p, int8_t* __restrict r, const T* __restrict g,
                     int8_t* __restrict qm, uint8_t* __restrict qv, float* scale_m,
                     float* scale_v, const T* __restrict ref, uint32_t first, int32_t count,
                     const AdamScalars& scalars) {
  // every loop runs on 32-bit lanes (codes widened first, narrowed last): a byte load or store
  // in a loop makes GCC process 64 elements at a time, which spills registers
  alignas(64) int32_t codes_m[kInt8Block];
  alignas(64) int32_t codes_v[kInt8Block];
  alignas(64) float m[kInt8Block];
  alignas(64) float v[kInt8Block];
  alignas(64) float root_v[kInt8Block];
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
    apply_decay<D, Ref>(grad, param, load(g[k]), ref, k, s.decay);
    const int32_t code = codes_m[k];
    const int32_t code_v = codes_v[k];
    // decode: (d(|q|)·s)·sign(q), the reference's order
    const float sign = static_cast<float>((code > 0) - (code < 0));
    const float m_old = (level<127, 2>(code < 0 ? -code : code) * sm) * sign;
    const float v_old = (level<255, 4>(code_v) * sv) * static_cast<float>(code_v != 0);
    const float exp_avg = lerp(m_old, grad, s.beta1_weight);
    const float exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, v_old * s.beta2);
    const float root = std::sqrt(exp_avg_sq);
    const float denom = root / s.bias_correction2_sqrt + s.eps;
    // a compensated θ's remainder takes the rehash's high half, as with bfloat16 moments (the
    // codes take the hash itself); a float32 θ does not compute it
    const uint32_t rehash = mix(mix((first + static_cast<uint32_t>(k)) ^ s.key));
    store_weight(p, r, k, param + s.lr_neg_step_size * exp_avg / denom, rehash);
    m[k] = exp_avg;
    v[k] = exp_avg_sq;
    root_v[k] = root;
  }
  const float new_sm = block_scale(m, count), new_sv = block_scale(v, count);
  const float safe_m = new_sm > 0 ? new_sm : 1.0f, safe_v = new_sv > 0 ? new_sv : 1.0f;
  const BlockScales scales{safe_m, 1.0f / safe_m, safe_v, 1.0f / safe_v, 1.0f / std::sqrt(safe_v)};
  int8_codes(codes_m, codes_v, m, v, root_v, first, count, s.key, new_sm != new_sm,
             new_sv != new_sv, scales);
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
template <typename T, Decay D, bool Ref>
void adam_int8_chunk(void* p, int8_t* r, const void* g, int8_t* qm, uint8_t* qv, float* scale_m,
                     float* scale_v, const void* ref, int64_t begin, int64_t end,
                     const AdamScalars& s) {
  T* const theta = static_cast<T*>(p);
  const T* const grad = static_cast<const T*>(g);
  const T* const init = static_cast<const T*>(ref);
  for (int64_t k = begin; k < end; k += kInt8Block) {
    const int64_t block = k / kInt8Block;
    adam_int8_block<T, D, Ref>(theta + k, r ? r + k : nullptr, grad + k, qm + k, qv + k,
                               scale_m + block, scale_v + block, Ref ? init + k : nullptr,
                               static_cast<uint32_t>(k),
                               static_cast<int32_t>(std::min<int64_t>(kInt8Block, end - k)), s);
  }
}

template <typename T, Decay D>
Int8Chunk pick_adam_int8(bool ref) {
  return ref ? adam_int8_chunk<T, D, true> : adam_int8_chunk<T, D, false>;
}

template <typename T>
Int8Chunk pick_adam_int8(Decay decay, bool ref) {
  switch (decay) {
    case Decay::kL2: return pick_adam_int8<T, Decay::kL2>(ref);
    case Decay::kDecoupled: return pick_adam_int8<T, Decay::kDecoupled>(ref);
    default: return pick_adam_int8<T, Decay::kNone>(ref);
  }
}

Int8Chunk pick_adam_int8(at::ScalarType param_dtype, Decay decay, bool ref) {
  switch (param_dtype) {
    case at::kBFloat16: return pick_adam_int8<uint16_t>(decay, ref);
    case at::kHalf: return pick_adam_int8<int16_t>(decay, ref);
    default: return pick_adam_int8<float>(decay, ref);
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
                     bool maximize, double grad_scale) {
  const size_t n = params.size();
  if (n == 0) return true;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  if (compensated ? remainders.size() != n ||
                        (param_dtype != at::kBFloat16 && param_dtype != at::kHalf)
                  : param_dtype != at::kFloat) {
    return false;
  }
  const bool ref = !references.empty();
  if (!usable_list(params, params, param_dtype) || !usable_list(grads, params, param_dtype) ||
      (compensated && !usable_list(remainders, params, at::kChar)) ||
      !usable_list(exp_avgs, params, at::kChar) || !usable_list(exp_avg_sqs, params, at::kByte) ||
      !usable_scales(exp_avg_scales, params) || !usable_scales(exp_avg_sq_scales, params) ||
      (ref && !usable_list(references, params, param_dtype)) || steps.size() != n ||
      !disjoint(params)) {
    return false;
  }
  if (!usable_steps(steps)) return false;
  const Int8Chunk chunk =
      pick_adam_int8(param_dtype, decay_mode(decoupled, weight_decay, decay), ref);
  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize);
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    void* g = grads[t].data_ptr();
    unscale(param_dtype, g, begin, end, grad_scale);
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
// group's `step` count, as the reference's); g and θ₀ in θ's dtype, float32 buffers.
// `fresh[t]`: the buffer of tensor t is new (its first step): b ← g, as torch does.
bool sgd_any_step(const Tensors& params, const Tensors& remainders, const Tensors& grads,
                  const Tensors& momentum_buffers, const std::vector<bool>& fresh,
                  const Tensors& references, double lr, double momentum, double dampening,
                  bool nesterov, double weight_decay, double decay, bool decoupled,
                  bool maximize, double grad_scale, bool cautious, double step) {
  const size_t n = params.size();
  if (n == 0) return true;
  const auto param_dtype = params[0].scalar_type();
  const bool compensated = !remainders.empty();
  if (compensated ? remainders.size() != n ||
                        (param_dtype != at::kBFloat16 && param_dtype != at::kHalf)
                  : param_dtype != at::kFloat) {
    return false;
  }
  const bool ref = !references.empty();
  const bool has_momentum = momentum != 0;
  if (!usable_list(params, params, param_dtype) || !usable_list(grads, params, param_dtype) ||
      (compensated && !usable_list(remainders, params, at::kChar)) ||
      (has_momentum && (!usable_list(momentum_buffers, params, at::kFloat) ||
                        fresh.size() != n)) ||
      (ref && !usable_list(references, params, param_dtype)) || !disjoint(params)) {
    return false;
  }
  if (compensated && !(std::isfinite(step) && step >= 0)) return false;
  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  std::vector<SgdScalars> scalars(n);
  std::vector<SgdChunk> kernels(n);
  for (size_t t = 0; t < n; ++t) {
    scalars[t] = SgdScalars{static_cast<float>(-lr), static_cast<float>(momentum),
                            static_cast<float>(1 - dampening),
                            decay_scalars(weight_decay, decay, maximize),
                            compensated ? rounding_key(step, static_cast<int64_t>(t)) : 0U};
    kernels[t] = pick_sgd(param_dtype, mode, ref, has_momentum, has_momentum && fresh[t],
                          nesterov, cautious);
  }
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    void* g = grads[t].data_ptr();
    unscale(param_dtype, g, begin, end, grad_scale);
    kernels[t](params[t].data_ptr(), compensated ? remainders[t].data_ptr<int8_t>() : nullptr,
               g, has_momentum ? momentum_buffers[t].data_ptr<float>() : nullptr,
               ref ? references[t].data_ptr() : nullptr, begin, end, scalars[t]);
  });
  bump_versions(params);
  if (compensated) bump_versions(remainders);
  if (has_momentum) bump_versions(momentum_buffers);
  if (grad_scale != 1.0) bump_versions(grads);
  return true;
}

bool sgd_step_(const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
               const std::vector<bool>& fresh, const Tensors& references, double lr,
               double momentum, double dampening, bool nesterov, double weight_decay,
               double decay, bool decoupled, bool maximize, double grad_scale,
               bool cautious) {
  return sgd_any_step(params, {}, grads, momentum_buffers, fresh, references, lr, momentum,
                      dampening, nesterov, weight_decay, decay, decoupled, maximize,
                      grad_scale, cautious, 0.0);
}

// Compensated bfloat16/float16 θ: sgd_step_'s arguments with each parameter's int8
// remainder and the group's step count (1 at its first step), which keys their rounding.
bool sgd_compensated_step_(const Tensors& params, const Tensors& remainders,
                           const Tensors& grads, const Tensors& momentum_buffers,
                           const std::vector<bool>& fresh, const Tensors& references,
                           double lr, double momentum, double dampening, bool nesterov,
                           double weight_decay, double decay, bool decoupled, bool maximize,
                           double grad_scale, bool cautious, double step) {
  if (remainders.size() != params.size()) return false;
  if (params.empty()) return true;
  return sgd_any_step(params, remainders, grads, momentum_buffers, fresh, references, lr,
                      momentum, dampening, nesterov, weight_decay, decay, decoupled, maximize,
                      grad_scale, cautious, step);
}

}  // namespace

// Python bindings (pybind11 converts a list of 1000 tensors several times faster than the
// dispatcher's boxed calls through torch.ops, which matters for models of many small
// tensors). The GIL is released while the threads work.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_step_", &adam_step_, py::call_guard<py::gil_scoped_release>());
  m.def("adam_compensated_step_", &adam_compensated_step_,
        py::call_guard<py::gil_scoped_release>());
  m.def("sgd_step_", &sgd_step_, py::call_guard<py::gil_scoped_release>());
  m.def("sgd_compensated_step_", &sgd_compensated_step_,
        py::call_guard<py::gil_scoped_release>());
  m.def("adam_int8_step_", &adam_int8_step_, py::call_guard<py::gil_scoped_release>());
}
