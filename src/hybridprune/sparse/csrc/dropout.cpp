// Dropout whose mask is a hash of (seed, element index), for LoRA fine-tuning on CPUs.
//
//   y[i] = x[i] / (1 - p)   if fmix(seed, i) >> 8 >= round(p * 2^24)   (a 24-bit uniform: kept with 1 - p)
//   y[i] = 0                otherwise
//
// torch's CPU dropout draws a Bernoulli sample per element from mt19937 (~4 ns an element on 2 cores here: 15 ms
// for a [4, 512, 1536] activation, 26x the LoRA product it feeds). A hash of the index is the same distribution
// (each element kept independently with probability 1 - p, to 2^-24), vectorises, and needs no stored mask: the
// backward pass applies the same function with the same seed to the gradient. The random stream is not torch's,
// so a run with it is a different draw of the same dropout, not the same run.
// Two paths give identical results (integer hash, one fp32 multiply): an AVX-512 one (the same loop compiled
// for it) and a portable one.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

namespace {

inline uint32_t fmix32(uint32_t h) {  // MurmurHash3's finaliser
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

template <typename T>
inline void keep_scaled(const T* x, T* y, int64_t i0, int64_t i1, uint32_t k0, uint32_t k1, uint32_t thr,
                        float scale) {
  for (int64_t i = i0; i < i1; i++) {
    const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
    const uint32_t h = fmix32(fmix32(lo ^ k0) + (hi ^ k1));
    y[i] = static_cast<T>((h >> 8) >= thr ? static_cast<float>(x[i]) * scale : 0.0f);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void keep_scaled_avx512(
    const float* x, float* y, int64_t i0, int64_t i1, uint32_t k0, uint32_t k1, uint32_t thr, float scale) {
  keep_scaled(x, y, i0, i1, k0, k1, thr, scale);
}
bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }
#else
void keep_scaled_avx512(const float*, float*, int64_t, int64_t, uint32_t, uint32_t, uint32_t, float) {}
bool has_avx512() { return false; }
#endif

template <typename T>
void run(const T* x, T* y, int64_t i0, int64_t i1, uint32_t k0, uint32_t k1, uint32_t thr, float scale, bool) {
  keep_scaled(x, y, i0, i1, k0, k1, thr, scale);
}
template <>
void run<float>(const float* x, float* y, int64_t i0, int64_t i1, uint32_t k0, uint32_t k1, uint32_t thr,
                float scale, bool wide) {
  if (wide) keep_scaled_avx512(x, y, i0, i1, k0, k1, thr, scale);
  else keep_scaled(x, y, i0, i1, k0, k1, thr, scale);
}

}  // namespace

// x (any shape, contiguous) -> the dropped and rescaled copy; portable forces the portable path (tests).
torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed, bool portable) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be within [0, 1)");
  auto y = torch::empty_like(x);
  const uint32_t thr = static_cast<uint32_t>(p * 16777216.0 + 0.5);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = fmix32(static_cast<uint32_t>(s)), k1 = fmix32(static_cast<uint32_t>(s >> 32) ^ 0x9E3779B9u);
  const int64_t n = x.numel();
  const bool wide = !portable && has_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hash_dropout", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      run<scalar_t>(xp, yp, i0, i1, k0, k1, thr, scale, wide);
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hash_dropout", &hash_dropout, "dropout with a mask hashed from (seed, index), rescaled by 1/(1-p)");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 path runs");
}
