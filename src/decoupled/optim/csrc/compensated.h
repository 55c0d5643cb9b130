// Compensated bfloat16/float16 weights: the float32 master weight θ + remainder.
//
// A part of the C++ kernel, included by parts.h inside its anonymous namespace, after
// arithmetic.h.

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
