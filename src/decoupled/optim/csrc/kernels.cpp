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
// a tensor is not a dense CPU float32 tensor laid out like its parameter, or a step count is
// negative or not finite: the caller then takes the reference path.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
template <Decay D, bool Ref>
inline void apply_decay(float& grad, float& param, float g, const float* ref, int64_t k,
                  const DecayScalars& s) {
  grad = s.sign * g;
  // g.add(θ − θ₀, alpha=λ)
  if constexpr (D == Decay::kL2) grad = fmadd(s.weight_decay, Ref ? param - ref[k] : param, grad);
  if constexpr (D == Decay::kDecoupled) {
    if constexpr (Ref) param = lerp(param, ref[k], s.rate);
    else param = param * s.keep;
  }
}

// Cautious weight decay (Chen, Li, Liang et al., arXiv 2510.12402), as decay.py's
// cautious_mask and apply_cautious_decay_: the decoupled decay of apply_decay, applied only
// where the step's direction u and θ − θ₀ agree in sign (zero agrees, NaN does not). Signs
// are compared rather than the product, which could round to ±0.
template <bool Ref>
inline void cautious_decay(float& param, float direction, const float* ref, int64_t k,
                           const DecayScalars& s) {
  const float offset = Ref ? param - ref[k] : param;
  const bool agree = (direction >= 0 && offset >= 0) || (direction <= 0 && offset <= 0);
  float decayed;
  if constexpr (Ref) decayed = lerp(param, ref[k], s.rate);
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

// `count` elements starting at element `first` of their tensor (the pointers already point
// there). A 32-bit loop counter keeps the hash's index arithmetic in 32-bit vector lanes.
// Cautious: decay after m_t, masked by the sign of m_t (that of m̂/(sqrt(v̂)+ε)).
template <typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious = false>
__attribute__((always_inline)) inline void adam_elements(
    float* __restrict p, const float* __restrict g, S* __restrict m, S* __restrict v,
    S* __restrict vmax, const float* __restrict ref, uint32_t first, int32_t count,
    const AdamScalars& s) {
#pragma omp simd
  for (int32_t k = 0; k < count; ++k) {
    float grad, param = p[k];
    apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, g[k], ref, k, s.decay);
    float exp_avg = lerp(load(m[k]), grad, s.beta1_weight);
    // v.mul_(β2).addcmul_(g, g, value=1 − β2): torch fuses ((1 − β2)·g)·g + β2·v
    float exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, load(v[k]) * s.beta2);
    if constexpr (Cautious) cautious_decay<Ref>(param, exp_avg, ref, k, s.decay);
    float second = exp_avg_sq;
    uint32_t random = mix((first + static_cast<uint32_t>(k)) ^ s.key);
    if constexpr (Amsgrad) {
      float previous = load(vmax[k]);
      // torch.maximum: a NaN in either operand gives NaN
      second = (previous > exp_avg_sq || previous != previous) ? previous : exp_avg_sq;
      store(&vmax[k], second, mix(random) & 0xFFFFU);
    }
    float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
    p[k] = param + s.lr_neg_step_size * exp_avg / denom;  // addcdiv_: not fused in torch
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
template <typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious>
void adam_chunk(float* __restrict p, const float* __restrict g, S* __restrict m,
                S* __restrict v, S* __restrict vmax, const float* __restrict ref, uint32_t first,
                int32_t count, AdamScalars s) {
  const auto elements = [&](int32_t k, int32_t n) {
    adam_elements<S, Amsgrad, D, Ref, Cautious>(p + k, g + k, m + k, v + k, Amsgrad ? vmax + k : nullptr,
                                      Ref ? ref + k : nullptr, first + k, n, s);
  };
  int32_t k = 0;
  if constexpr (sizeof(S) < sizeof(float)) {
    for (; k + kBlock <= count; k += kBlock) {
      prefetch_block(p, k);
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

using AdamChunk = void (*)(float*, const float*, void*, void*, void*, const float*, int64_t,
                           int64_t, AdamScalars);

template <typename S, bool Amsgrad, Decay D, bool Ref, bool Cautious>
void adam_chunk_erased(float* p, const float* g, void* m, void* v, void* vmax, const float* ref,
                       int64_t begin, int64_t end, AdamScalars s) {
  auto at = [begin](void* base) { return base ? static_cast<S*>(base) + begin : nullptr; };
  adam_chunk<S, Amsgrad, D, Ref, Cautious>(p + begin, g + begin, at(m), at(v), at(vmax),
                                 ref ? ref + begin : nullptr, static_cast<uint32_t>(begin),
                                 static_cast<int32_t>(end - begin), s);
}

template <typename S, bool Amsgrad, Decay D, bool Cautious = false>
AdamChunk pick_adam(bool ref) {
  return ref ? adam_chunk_erased<S, Amsgrad, D, true, Cautious>
             : adam_chunk_erased<S, Amsgrad, D, false, Cautious>;
}

template <typename S, bool Amsgrad>
AdamChunk pick_adam(Decay decay, bool ref, bool cautious) {
  switch (decay) {
    case Decay::kL2: return pick_adam<S, Amsgrad, Decay::kL2>(ref);
    case Decay::kDecoupled:
      return cautious ? pick_adam<S, Amsgrad, Decay::kDecoupled, true>(ref)
                      : pick_adam<S, Amsgrad, Decay::kDecoupled>(ref);
    default: return pick_adam<S, Amsgrad, Decay::kNone>(ref);
  }
}

AdamChunk pick_adam(bool compact, bool amsgrad, Decay decay, bool ref, bool cautious) {
  if (compact) {
    return amsgrad ? pick_adam<uint16_t, true>(decay, ref, cautious)
                   : pick_adam<uint16_t, false>(decay, ref, cautious);
  }
  return amsgrad ? pick_adam<float, true>(decay, ref, cautious)
                 : pick_adam<float, false>(decay, ref, cautious);
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
inline void unscale(float* __restrict g, int64_t begin, int64_t end, double grad_scale) {
  if (grad_scale == 1.0) return;
  const float scale = static_cast<float>(grad_scale);
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) g[k] = g[k] / scale;
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

bool adam_step_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                const Tensors& references, const Tensors& steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, double decay, bool decoupled,
                bool amsgrad, bool maximize, double grad_scale, bool cautious) {
  const size_t n = params.size();
  if (n == 0) return true;
  if (exp_avgs.size() != n) return false;
  const auto state_dtype = exp_avgs[0].scalar_type();
  if (state_dtype != at::kFloat && state_dtype != at::kBFloat16) return false;
  const bool ref = !references.empty();
  if (!usable_list(params, params, at::kFloat) || !usable_list(grads, params, at::kFloat) ||
      !usable_list(exp_avgs, params, state_dtype) ||
      !usable_list(exp_avg_sqs, params, state_dtype) ||
      (amsgrad && !usable_list(max_exp_avg_sqs, params, state_dtype)) ||
      (ref && !usable_list(references, params, at::kFloat)) || steps.size() != n ||
      !disjoint(params)) {
    return false;
  }
  if (!usable_steps(steps)) return false;

  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  const AdamChunk chunk =
      pick_adam(state_dtype == at::kBFloat16, amsgrad, mode, ref, cautious);

  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize);
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    unscale(grads[t].data_ptr<float>(), begin, end, grad_scale);
    chunk(params[t].data_ptr<float>(), grads[t].data_ptr<float>(), exp_avgs[t].data_ptr(),
          exp_avg_sqs[t].data_ptr(), amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr,
          ref ? references[t].data_ptr<float>() : nullptr, begin, end, scalars[t]);
  });
  for (at::TensorList written : {params, exp_avgs, exp_avg_sqs, steps}) bump_versions(written);
  if (grad_scale != 1.0) bump_versions(grads);
  if (amsgrad) bump_versions(max_exp_avg_sqs);
  return true;
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
// pointers already point there); `scale_m`, `scale_v` point at the block's scales.
template <Decay D, bool Ref>
void adam_int8_block(float* __restrict p, const float* __restrict g, int8_t* __restrict qm,
                     uint8_t* __restrict qv, float* scale_m, float* scale_v,
                     const float* __restrict ref, uint32_t first, int32_t count,
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
    float grad, param = p[k];
    apply_decay<D, Ref>(grad, param, g[k], ref, k, s.decay);
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
    p[k] = param + s.lr_neg_step_size * exp_avg / denom;
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

using Int8Chunk = void (*)(float*, const float*, int8_t*, uint8_t*, float*, float*, const float*,
                           int64_t, int64_t, const AdamScalars&);

// The elements [begin, end) of a tensor, begin a multiple of kInt8Block (for_each_chunk's).
template <Decay D, bool Ref>
void adam_int8_chunk(float* p, const float* g, int8_t* qm, uint8_t* qv, float* scale_m,
                     float* scale_v, const float* ref, int64_t begin, int64_t end,
                     const AdamScalars& s) {
  for (int64_t k = begin; k < end; k += kInt8Block) {
    const int64_t block = k / kInt8Block;
    adam_int8_block<D, Ref>(p + k, g + k, qm + k, qv + k, scale_m + block, scale_v + block,
                            Ref ? ref + k : nullptr, static_cast<uint32_t>(k),
                            static_cast<int32_t>(std::min<int64_t>(kInt8Block, end - k)), s);
  }
}

template <Decay D>
Int8Chunk pick_adam_int8(bool ref) {
  return ref ? adam_int8_chunk<D, true> : adam_int8_chunk<D, false>;
}

Int8Chunk pick_adam_int8(Decay decay, bool ref) {
  switch (decay) {
    case Decay::kL2: return pick_adam_int8<Decay::kL2>(ref);
    case Decay::kDecoupled: return pick_adam_int8<Decay::kDecoupled>(ref);
    default: return pick_adam_int8<Decay::kNone>(ref);
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

// Adam/AdamW (no amsgrad: _int8.py refuses it) with int8 moments; as adam_step_ otherwise.
bool adam_int8_step_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                     const Tensors& exp_avg_sqs, const Tensors& exp_avg_scales,
                     const Tensors& exp_avg_sq_scales, const Tensors& references,
                     const Tensors& steps, double lr, double beta1, double beta2, double eps,
                     double weight_decay, double decay, bool decoupled, bool maximize,
                     double grad_scale) {
  const size_t n = params.size();
  if (n == 0) return true;
  const bool ref = !references.empty();
  if (!usable_list(params, params, at::kFloat) || !usable_list(grads, params, at::kFloat) ||
      !usable_list(exp_avgs, params, at::kChar) || !usable_list(exp_avg_sqs, params, at::kByte) ||
      !usable_scales(exp_avg_scales, params) || !usable_scales(exp_avg_sq_scales, params) ||
      (ref && !usable_list(references, params, at::kFloat)) || steps.size() != n ||
      !disjoint(params)) {
    return false;
  }
  if (!usable_steps(steps)) return false;
  const Int8Chunk chunk = pick_adam_int8(decay_mode(decoupled, weight_decay, decay), ref);
  const std::vector<AdamScalars> scalars =
      advance_steps(steps, lr, beta1, beta2, eps, weight_decay, decay, maximize);
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    unscale(grads[t].data_ptr<float>(), begin, end, grad_scale);
    chunk(params[t].data_ptr<float>(), grads[t].data_ptr<float>(),
          exp_avgs[t].data_ptr<int8_t>(), exp_avg_sqs[t].data_ptr<uint8_t>(),
          exp_avg_scales[t].data_ptr<float>(), exp_avg_sq_scales[t].data_ptr<float>(),
          ref ? references[t].data_ptr<float>() : nullptr, begin, end, scalars[t]);
  });
  for (at::TensorList written :
       {params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps}) {
    bump_versions(written);
  }
  if (grad_scale != 1.0) bump_versions(grads);
  return true;
}

struct SgdScalars {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  DecayScalars decay;
};

// Cautious: decay after the buffer, masked by the sign of the direction d_t the step takes.
template <Decay D, bool Ref, bool Momentum, bool Fresh, bool Nesterov, bool Cautious = false>
void sgd_chunk(float* __restrict p, const float* __restrict g, float* __restrict buf,
               const float* __restrict ref, int64_t begin, int64_t end, SgdScalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float grad, param = p[i];
    apply_decay<Cautious ? Decay::kNone : D, Ref>(grad, param, g[i], ref, i, s.decay);
    if constexpr (Momentum) {
      // b.mul_(μ).add_(g, alpha=1 − τ); g.add(b, alpha=μ); θ.add_(g, alpha=−γ)
      float b = Fresh ? grad : fmadd(s.one_minus_dampening, grad, buf[i] * s.momentum);
      buf[i] = b;
      grad = Nesterov ? fmadd(s.momentum, b, grad) : b;
    }
    if constexpr (Cautious) cautious_decay<Ref>(param, grad, ref, i, s.decay);
    p[i] = fmadd(s.neg_lr, grad, param);
  }
}

using SgdChunk = void (*)(float*, const float*, float*, const float*, int64_t, int64_t,
                          SgdScalars);

template <Decay D, bool Ref, bool C>
SgdChunk pick_sgd(bool momentum, bool fresh, bool nesterov) {
  if (!momentum) return sgd_chunk<D, Ref, false, false, false, C>;
  if (fresh) {
    return nesterov ? sgd_chunk<D, Ref, true, true, true, C>
                    : sgd_chunk<D, Ref, true, true, false, C>;
  }
  return nesterov ? sgd_chunk<D, Ref, true, false, true, C>
                  : sgd_chunk<D, Ref, true, false, false, C>;
}

template <Decay D, bool C = false>
SgdChunk pick_sgd(bool ref, bool momentum, bool fresh, bool nesterov) {
  return ref ? pick_sgd<D, true, C>(momentum, fresh, nesterov)
             : pick_sgd<D, false, C>(momentum, fresh, nesterov);
}

SgdChunk pick_sgd(Decay decay, bool ref, bool momentum, bool fresh, bool nesterov,
                  bool cautious) {
  switch (decay) {
    case Decay::kL2: return pick_sgd<Decay::kL2>(ref, momentum, fresh, nesterov);
    case Decay::kDecoupled:
      return cautious ? pick_sgd<Decay::kDecoupled, true>(ref, momentum, fresh, nesterov)
                      : pick_sgd<Decay::kDecoupled>(ref, momentum, fresh, nesterov);
    default: return pick_sgd<Decay::kNone>(ref, momentum, fresh, nesterov);
  }
}

// `fresh[t]`: the buffer of tensor t is new (its first step): b ← g, as torch does.
bool sgd_step_(const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
               const std::vector<bool>& fresh, const Tensors& references, double lr,
               double momentum, double dampening, bool nesterov, double weight_decay,
               double decay, bool decoupled, bool maximize, double grad_scale,
               bool cautious) {
  const size_t n = params.size();
  if (n == 0) return true;
  const bool ref = !references.empty();
  const bool has_momentum = momentum != 0;
  if (!usable_list(params, params, at::kFloat) || !usable_list(grads, params, at::kFloat) ||
      (has_momentum && (!usable_list(momentum_buffers, params, at::kFloat) ||
                        fresh.size() != n)) ||
      (ref && !usable_list(references, params, at::kFloat)) || !disjoint(params)) {
    return false;
  }
  const Decay mode = decay_mode(decoupled, weight_decay, decay);
  const SgdScalars scalars{static_cast<float>(-lr), static_cast<float>(momentum),
                           static_cast<float>(1 - dampening),
                           decay_scalars(weight_decay, decay, maximize)};
  std::vector<SgdChunk> kernels(n);
  for (size_t t = 0; t < n; ++t) {
    kernels[t] =
        pick_sgd(mode, ref, has_momentum, has_momentum && fresh[t], nesterov, cautious);
  }
  for_each_chunk(params, [&](int64_t t, int64_t begin, int64_t end) {
    unscale(grads[t].data_ptr<float>(), begin, end, grad_scale);
    kernels[t](params[t].data_ptr<float>(), grads[t].data_ptr<float>(),
               has_momentum ? momentum_buffers[t].data_ptr<float>() : nullptr,
               ref ? references[t].data_ptr<float>() : nullptr, begin, end, scalars);
  });
  bump_versions(params);
  if (has_momentum) bump_versions(momentum_buffers);
  if (grad_scale != 1.0) bump_versions(grads);
  return true;
}

}  // namespace

// Python bindings (pybind11 converts a list of 1000 tensors several times faster than the
// dispatcher's boxed calls through torch.ops, which matters for models of many small
// tensors). The GIL is released while the threads work.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_step_", &adam_step_, py::call_guard<py::gil_scoped_release>());
  m.def("sgd_step_", &sgd_step_, py::call_guard<py::gil_scoped_release>());
  m.def("adam_int8_step_", &adam_int8_step_, py::call_guard<py::gil_scoped_release>());
}
