// Sparse matrix products computed from hybridprune's packed weights, without unpacking them.
//
//   y[b, n] = sum_k W[n, k] * x[b, k]  for W stored as one of
//     unstructured  a row-major bitmask (bit k%8 of byte k/8) and the kept values in row order;
//     2:4           per row K/2 values and a 2-bit position per value (value j at bits 2*(j%4) of byte j/4);
//     tiered        16x16 blocks with a tier map: dense blocks column-major, 2:4 blocks as 8 value columns of
//                   16 rows (value t of row r at t*16+r) with one 32-bit word of positions per column (2 bits
//                   per row), top-k blocks as k values and k one-byte positions (row*16+col) in the block.
//
// Two implementations give bit-identical results: an AVX2+FMA one and a portable one that performs the same
// fused multiply-adds in the same order (std::fma), so a CPU without AVX2 computes exactly the same numbers.
// Every product accumulates in fp32; weights may be fp32, bf16 (stored as their upper 16 bits) or int8 (converted
// to fp32 in registers; the caller multiplies each output by its row's scale).
// With int8 weights, x may be rounded to int8 too: then the sums are exact int32 (the int8-activation section).
// Threads: at::parallel_for over rows (unstructured, 2:4) or 16-row block rows (tiered).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HP_X86 1
#endif

namespace {

inline float to_f(float v) { return v; }
inline float to_f(int8_t v) { return static_cast<float>(v); }
inline float to_f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The fixed reduction order of 8 lanes that both implementations use.
inline float reduce8(const float* a) {
  float s4[4], s2[2];
  for (int i = 0; i < 4; i++) s4[i] = a[i] + a[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

// Which 64-column step the AVX-512 unstructured int8 kernel takes: 0 the CPU's (XB on Intel), 1 the computed
// permute control, 2 XB (Expand64, below); set by int8_step.
std::atomic<int> g_int8_step{0};

constexpr int BC = 4;  // batch rows per pass over a weight row / block row (the weights stay in cache): AVX2, portable
constexpr int BC_WIDE = 8;  // AVX-512 (32 registers): twice the rows a pass, so each weight is decoded half as often

// The passes over a batch of B rows, up to MAX at a time: f(nb, b0) for the pass starting at batch row b0, nb
// holding its row count as a compile-time constant (nb.value), so that the kernel's accumulators live in registers.
template <int MAX = BC, typename F>
__attribute__((always_inline)) inline void batch_passes(int64_t B, F&& f) {
  static_assert(MAX == 4 || MAX == 8, "passes of 4 or 8 rows");
  for (int64_t b0 = 0; b0 < B; b0 += MAX) {
    switch (std::min<int64_t>(MAX, B - b0)) {
      case 1: f(std::integral_constant<int, 1>{}, b0); break;
      case 2: f(std::integral_constant<int, 2>{}, b0); break;
      case 3: f(std::integral_constant<int, 3>{}, b0); break;
      case 4: f(std::integral_constant<int, 4>{}, b0); break;
      case 5: if constexpr (MAX == 8) f(std::integral_constant<int, 5>{}, b0); break;
      case 6: if constexpr (MAX == 8) f(std::integral_constant<int, 6>{}, b0); break;
      case 7: if constexpr (MAX == 8) f(std::integral_constant<int, 7>{}, b0); break;
      default: if constexpr (MAX == 8) f(std::integral_constant<int, 8>{}, b0); break;
    }
  }
}

// ----------------------------------------------------------------------------- portable

template <typename W>
void unstructured_portable(const float* x, int64_t B, int64_t Kp, const uint8_t* mask, const W* vals,
                           const int64_t* rowptr, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t mb = Kp / 8;
  for (int64_t r = n0; r < n1; r++) {
    for (int64_t b = 0; b < B; b++) {
      float acc[2][8] = {{0}};  // even and odd mask bytes, as the AVX2 code
      const W* v = vals + rowptr[r];
      const float* xb = x + b * Kp;
      for (int64_t c = 0; c < mb; c++) {
        const uint8_t m = mask[r * mb + c];  // an empty byte too: the AVX2 code does not branch on it
        for (int i = 0; i < 8; i++) {
          const float w = (m >> i) & 1 ? to_f(*v++) : 0.0f;
          acc[c % 2][i] = std::fma(w, xb[c * 8 + i], acc[c % 2][i]);
        }
      }
      float sum[8];
      for (int i = 0; i < 8; i++) sum[i] = acc[0][i] + acc[1][i];
      y[b * N + r] = reduce8(sum);
    }
  }
}

template <typename W>
void nm24_portable(const float* x, int64_t B, int64_t K, const W* vals, const uint8_t* pos, int64_t n0,
                   int64_t n1, int64_t N, float* y) {
  const int64_t nv = K / 2;
  for (int64_t r = n0; r < n1; r++) {
    for (int64_t b = 0; b < B; b++) {
      float acc[16] = {0};  // value j in lane j % 16: two 8-lane halves, as the AVX2 code's two accumulators
      const float* xb = x + b * K;
      for (int64_t j0 = 0; j0 < nv; j0 += 8) {  // 8 kept values = 4 groups = 16 columns
        for (int i = 0; i < 8; i++) {
          const int64_t j = j0 + i;
          const int p = (pos[r * (nv / 4) + j / 4] >> (2 * (j % 4))) & 3;
          acc[j % 16] = std::fma(to_f(vals[r * nv + j]), xb[(j / 2) * 4 + p], acc[j % 16]);
        }
      }
      float sum[8];
      for (int i = 0; i < 8; i++) sum[i] = acc[i] + acc[i + 8];
      y[b * N + r] = reduce8(sum);
    }
  }
}

template <typename W>
void tiered_portable(const float* x, int64_t B, int64_t C, const int8_t* tiers, const W* dense,
                     const W* nmv, const uint32_t* nmp, const W* tkv, const uint8_t* tkp, int64_t k,
                     const int64_t* off, int64_t r0, int64_t r1, int64_t Np, float* y) {
  const int64_t Kp = C * 16;
  for (int64_t R = r0; R < r1; R++) {
    for (int64_t b = 0; b < B; b++) {
      float acc[16] = {0}, top[16] = {0};
      int64_t d = off[R * 3], n = off[R * 3 + 1], t = off[R * 3 + 2];
      const float* xb = x + b * Kp;
      for (int64_t c = 0; c < C; c++) {
        const float* xc = xb + c * 16;
        const int tier = tiers[R * C + c];
        if (tier == 0) {
          const W* w = dense + d++ * 256;
          for (int j = 0; j < 16; j++)
            for (int i = 0; i < 16; i++) acc[i] = std::fma(to_f(w[j * 16 + i]), xc[j], acc[i]);
        } else if (tier == 1) {
          const W* w = nmv + n * 128;
          const uint32_t* p = nmp + n * 8;
          n++;
          for (int s = 0; s < 8; s++)
            for (int i = 0; i < 16; i++)
              acc[i] = std::fma(to_f(w[s * 16 + i]), xc[(s / 2) * 4 + ((p[s] >> (2 * i)) & 3)], acc[i]);
        } else if (tier == 2) {
          const W* w = tkv + t * k;
          const uint8_t* p = tkp + t * k;
          t++;
          for (int64_t e = 0; e < k; e++) top[p[e] >> 4] = std::fma(to_f(w[e]), xc[p[e] & 15], top[p[e] >> 4]);
        }
      }
      for (int i = 0; i < 16; i++) y[b * Np + R * 16 + i] = acc[i] + top[i];
    }
  }
}


// ----------------------------------------------------------------------------- decoding rows to dense

template <typename W>
void unstructured_rows(const uint8_t* mask, const W* vals, const int64_t* rowptr, int64_t Kp, int64_t r0,
                       int64_t r1, float* out) {
  const int64_t mb = Kp / 8;
  for (int64_t r = r0; r < r1; r++) {
    const W* v = vals + rowptr[r];
    float* o = out + (r - r0) * Kp;
    for (int64_t c = 0; c < mb; c++) {
      const uint8_t m = mask[r * mb + c];
      for (int i = 0; i < 8; i++) o[c * 8 + i] = (m >> i) & 1 ? to_f(*v++) : 0.0f;
    }
  }
}

template <typename W>
void nm24_rows(const W* vals, const uint8_t* pos, int64_t K, int64_t r0, int64_t r1, float* out) {
  const int64_t nv = K / 2;
  for (int64_t r = r0; r < r1; r++) {
    float* o = out + (r - r0) * K;
    std::fill(o, o + K, 0.0f);
    for (int64_t j = 0; j < nv; j++)
      o[(j / 2) * 4 + ((pos[r * (nv / 4) + j / 4] >> (2 * (j % 4))) & 3)] = to_f(vals[r * nv + j]);
  }
}

// The blocks of a tiered matrix written k-major: column j of a block (its 16 rows) at o + j * ld, portable (the
// AVX2 and AVX-512 writers below do the same in vectors).
template <typename W>
void dense_block_portable(const W* w, float* o, int64_t ld) {
  for (int j = 0; j < 16; j++)
    for (int i = 0; i < 16; i++) o[j * ld + i] = to_f(w[j * 16 + i]);
}
template <typename W>
void nm_block_portable(const W* w, const uint32_t* p, float* o, int64_t ld) {
  for (int j = 0; j < 16; j++) std::fill(o + j * ld, o + j * ld + 16, 0.0f);
  for (int s = 0; s < 8; s++)
    for (int i = 0; i < 16; i++) o[((s / 2) * 4 + ((p[s] >> (2 * i)) & 3)) * ld + i] = to_f(w[s * 16 + i]);
}

// Block rows [R0, R1) of a tiered matrix, transposed: out[k * ld + (R - Rb) * 16 + i] = W[R * 16 + i][k], so that
// each block's columns are 16 consecutive floats (the writers above); top-k and empty blocks are zeros and their
// kept weights.
template <typename W>
void tiered_cols(int64_t C, const int8_t* tiers, const W* dense, const W* nmv, const uint32_t* nmp, const W* tkv,
                 const uint8_t* tkp, int64_t k, const int64_t* off, int64_t R0, int64_t R1, int64_t Rb, float* out,
                 int64_t ld, void (*dense_block)(const W*, float*, int64_t),
                 void (*nm_block)(const W*, const uint32_t*, float*, int64_t)) {
  for (int64_t R = R0; R < R1; R++) {
    int64_t d = off[R * 3], n = off[R * 3 + 1], t = off[R * 3 + 2];
    for (int64_t c = 0; c < C; c++) {
      float* o = out + c * 16 * ld + (R - Rb) * 16;
      const int tier = tiers[R * C + c];
      if (tier == 0) {
        dense_block(dense + d++ * 256, o, ld);
      } else if (tier == 1) {
        nm_block(nmv + n * 128, nmp + n * 8, o, ld);
        n++;
      } else {
        for (int j = 0; j < 16; j++) std::fill(o + j * ld, o + j * ld + 16, 0.0f);
        if (tier != 2) continue;
        const W* w = tkv + t * k;
        const uint8_t* p = tkp + t * k;
        t++;
        for (int64_t e = 0; e < k; e++) o[(p[e] & 15) * ld + (p[e] >> 4)] = to_f(w[e]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- AVX2 + FMA

// A block row's outputs for NB batch rows: the vector sums plus the top-k blocks' sums, row by row.
template <int NB>
__attribute__((always_inline)) inline void store_block_row(const float (*a)[16], const float (*top)[16], float* yr,
                                                           int64_t Np) {
  for (int i = 0; i < NB; i++)
    for (int j = 0; j < 16; j++) yr[i * Np + j] = a[i][j] + top[i][j];
}

// A top-k block's k scalar FMAs into the row sums top[i][0..15] of NB batch rows (the vector paths' order).
template <int NB, typename W>
__attribute__((always_inline)) inline void topk_block(const W* w, const uint8_t* p, int64_t k, const float* xc,
                                                      int64_t Kp, float (*top)[16]) {
  for (int i = 0; i < NB; i++)
    for (int64_t e = 0; e < k; e++) top[i][p[e] >> 4] = std::fma(to_f(w[e]), xc[i * Kp + (p[e] & 15)], top[i][p[e] >> 4]);
}

#ifdef HP_X86
#define HP_AVX2 __attribute__((target("avx2,fma,popcnt")))  // popcnt: else __builtin_popcount is a libgcc call

// For each byte m of mask, one 32-bit word: nibble i (bits 4i..4i+3) says where lane i's weight sits among the
// packed values of that byte (low 3 bits) and whether lane i holds a kept weight at all (bit 3). 1 KB, so it stays
// in L1 beside x.
struct ExpandTable {
  uint32_t nib[256];
  ExpandTable() {
    for (int m = 0; m < 256; m++) {
      uint32_t w = 0;
      int c = 0;
      for (int i = 0; i < 8; i++)
        if ((m >> i) & 1) w |= (8u | static_cast<uint32_t>(c++)) << (4 * i);
      nib[m] = w;
    }
  }
};
const ExpandTable& expand_table() {
  static ExpandTable t;
  return t;
}

HP_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
HP_AVX2 inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
HP_AVX2 inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

HP_AVX2 inline void store_reduce(__m256 acc, float* out) {
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  *out = reduce8(a);
}

// The 8 weights of one mask byte: the next popcount(m) values moved to the lanes of m's set bits, zeros elsewhere
// (vpermps reads the low 3 bits of each nibble, the blend the kept bit moved to the sign).
template <bool CHECK = true, typename W>
HP_AVX2 __attribute__((always_inline)) inline __m256 expand8(const ExpandTable& T, int m, const W* src, const W* end, W* tail) {
  if (CHECK && src + 8 > end) {  // the last values of the matrix: never read past its end
    const int64_t left = end - src;
    for (int i = 0; i < 8; i++) tail[i] = i < left ? src[i] : W(0);
    src = tail;
  }
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(T.nib[m])),
                                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  return _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(load8(src), idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Two accumulators per batch row (even and odd mask bytes), so consecutive FMAs do not wait on each other;
// the portable code sums in the same order. NB (the batch rows of one pass) is a compile-time count, so the
// accumulators live in registers; the loop over a word's bytes is unrolled and has no branch (an empty byte adds
// zeros); CHECK guards reads past the values' end, needed only in the matrix's last rows.
template <int NB, bool CHECK, typename W>
HP_AVX2 __attribute__((always_inline)) inline void unstructured_row_avx2(const ExpandTable& T, const float* xr,
    int64_t Kp, const uint8_t* mr, const W* v, const W* vend, W* tail, float* yr, int64_t N) {
  const int64_t mb = Kp / 8;
  __m256 even[NB], odd[NB];
  for (int i = 0; i < NB; i++) even[i] = odd[i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= mb; c += 8) {  // 64 columns: each byte's values start at a popcount of one word
    uint64_t mw;
    std::memcpy(&mw, mr + c, 8);
#pragma GCC unroll 4
    for (int q = 0; q < 8; q += 2) {
      const int m0 = static_cast<int>((mw >> (8 * q)) & 0xFF), m1 = static_cast<int>((mw >> (8 * q + 8)) & 0xFF);
      const uint64_t below = (uint64_t(1) << (8 * q)) - 1;
      const __m256 w0 = expand8<CHECK>(T, m0, v + __builtin_popcountll(mw & below), vend, tail);
      for (int i = 0; i < NB; i++) even[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + i * Kp + (c + q) * 8), even[i]);
      const __m256 w1 = expand8<CHECK>(T, m1, v + __builtin_popcountll(mw & ((below << 8) | 0xFF)), vend, tail);
      for (int i = 0; i < NB; i++) odd[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + i * Kp + (c + q + 1) * 8), odd[i]);
    }
    v += __builtin_popcountll(mw);
  }
  for (; c < mb; c++) {
    const int m = mr[c];
    const __m256 w = expand8<CHECK>(T, m, v, vend, tail);
    if (c % 2)
      for (int i = 0; i < NB; i++) odd[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + i * Kp + c * 8), odd[i]);
    else
      for (int i = 0; i < NB; i++) even[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + i * Kp + c * 8), even[i]);
    v += __builtin_popcount(m);
  }
  for (int i = 0; i < NB; i++) store_reduce(_mm256_add_ps(even[i], odd[i]), yr + i * N);
}

// int8 values, 8 columns a shuffle. Each mask byte's kept values are broadcast to both 128-bit halves, and one byte
// shuffle puts each into the top byte of its column's 32-bit lane, with zeros below (its control: one 32-byte row
// of kTop). That lane, read as an int32, is the value times 2^24, and converting it to fp32 is exact, so no
// sign-extension is needed: the sums are 2^24 times the 8-column step's, bit for bit, and the row's total is scaled
// back by 2^-24, also exact (the same bits unless a product or partial sum is below 2^-126, where the unscaled
// sum would round as a subnormal, or above 2^104; activations of a language model are far from both).
// Mask byte 2k into `even`, 2k + 1 into `odd`, as the 8-column step. Old and new in one process (forced AVX2, AMD
// EPYC Zen 4, 50% kept, batch 1): the top-byte shuffle 1.08-1.26x the two-shuffle 16-column step it replaced; 64
// columns a step (one mask word) with a prefetch of the values, 1.07-1.11x more in cache and 1.28-1.30x from DRAM,
// where the step had no prefetch (the kernels results page).
struct TopRows {
  alignas(64) uint8_t row[256][32];  // mask byte m: lane i's top byte the index of its value, 0x80 (zero) elsewhere
  TopRows() {
    for (int m = 0; m < 256; m++)
      for (int i = 0, c = 0; i < 8; i++) {
        const bool kept = (m >> i) & 1;
        for (int b = 0; b < 3; b++) row[m][4 * i + b] = 0x80;
        row[m][4 * i + 3] = kept ? static_cast<uint8_t>(c) : 0x80;
        c += kept;
      }
  }
};
const TopRows kTop;
constexpr float kTopScale = 0x1p-24f;

HP_AVX2 __attribute__((always_inline)) inline __m256 top8(int m, const int8_t* v) {
  int64_t b;  // 8 bytes, of which the shuffle reads the first popcount(m)
  std::memcpy(&b, v, 8);
  return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(b),
                                                _mm256_load_si256(reinterpret_cast<const __m256i*>(kTop.row[m]))));
}

// Mask bytes lo and hi (16 columns from xc) into even and odd; returns where the next byte's values start.
template <int NB>
HP_AVX2 __attribute__((always_inline)) inline const int8_t* top16(int lo, int hi, const int8_t* v, const float* xc,
                                                                 int64_t Kp, __m256* even, __m256* odd) {
  const int8_t* v2 = v + _mm_popcnt_u32(lo);
  const __m256 w0 = top8(lo, v), w1 = top8(hi, v2);
  for (int i = 0; i < NB; i++) {
    even[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc + i * Kp), even[i]);
    odd[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xc + i * Kp + 8), odd[i]);
  }
  return v2 + _mm_popcnt_u32(hi);
}

template <int NB>
HP_AVX2 void unstructured_row_int8_avx2(const float* xr, int64_t Kp, const uint8_t* mr, const int8_t* v, float* yr,
                                     int64_t N) {
  const int64_t mb = Kp / 8;
  __m256 even[NB], odd[NB];
  for (int i = 0; i < NB; i++) even[i] = odd[i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= mb; c += 8) {  // 64 columns: one mask word, one prefetch 4 KB ahead in the values
    _mm_prefetch(reinterpret_cast<const char*>(v) + 4096, _MM_HINT_T0);
    uint64_t mw;
    std::memcpy(&mw, mr + c, 8);
#pragma GCC unroll 4
    for (int q = 0; q < 8; q += 2)
      v = top16<NB>(static_cast<int>((mw >> (8 * q)) & 0xFF), static_cast<int>((mw >> (8 * q + 8)) & 0xFF), v,
                    xr + (c + q) * 8, Kp, even, odd);
  }
  for (; c + 2 <= mb; c += 2) v = top16<NB>(mr[c], mr[c + 1], v, xr + c * 8, Kp, even, odd);  // the last 16-48
  if (c < mb) {  // an odd last byte: into `even`, as the 8-column step
    const __m256 w0 = top8(mr[c], v);
    for (int i = 0; i < NB; i++) even[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + i * Kp + c * 8), even[i]);
  }
  for (int i = 0; i < NB; i++) {
    store_reduce(_mm256_add_ps(even[i], odd[i]), yr + i * N);
    yr[i * N] *= kTopScale;
  }
}

template <int NB, typename W>
HP_AVX2 void unstructured_pass_avx2(const ExpandTable& T, const float* xr, int64_t Kp, const uint8_t* mask,
                                    const W* vals, const W* vend, const int64_t* rowptr, int64_t n0, int64_t n1,
                                    W* tail, float* yr, int64_t N) {
  const int64_t mb = Kp / 8;
  for (int64_t r = n0; r < n1; r++) {
    const W* v = vals + rowptr[r];
    if constexpr (std::is_same_v<W, int8_t>) {
      if (vals + rowptr[r + 1] + 8 <= vend) {  // each 8-byte read starts at or before the row's end
        unstructured_row_int8_avx2<NB>(xr, Kp, mask + r * mb, v, yr + r, N);
        continue;
      }
    }
    if (vals + rowptr[r + 1] + 8 <= vend)  // no read of this row can pass the end
      unstructured_row_avx2<NB, false>(T, xr, Kp, mask + r * mb, v, vend, tail, yr + r, N);
    else
      unstructured_row_avx2<NB, true>(T, xr, Kp, mask + r * mb, v, vend, tail, yr + r, N);
  }
}


// One weight row against NB batch rows (a compile-time count: the accumulators stay in registers).
template <int NB, typename W>
HP_AVX2 void nm24_row_avx2(const float* x, int64_t K, const W* vr, const uint8_t* pr, float* yr, int64_t N) {
  const int64_t nv = K / 2;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[2][NB];  // even and odd groups of 8 values (the portable code's two halves)
  for (int i = 0; i < NB; i++) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
  // 16 values a step, the even group of 8 into acc[0] and the odd into acc[1] by name: indexed by (j0 / 8) % 2,
  // the accumulators lived on the stack, and the step ran at half speed (AVX2, AMD EPYC Zen 4: 2.2x int8, 1.1-2.6x
  // fp32 values, the same sums)
  const __m256i shifts_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  int64_t j0 = 0;
  for (; j0 + 16 <= nv; j0 += 16) {
    uint32_t p32;
    std::memcpy(&p32, pr + j0 / 4, 4);
    const __m256i pw = _mm256_set1_epi32(static_cast<int>(p32));
    const __m256i idx0 = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(pw, shifts), three));
    const __m256i idx1 = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(pw, shifts_hi), three));
    const __m256 w0 = load8(vr + j0), w1 = load8(vr + j0 + 8);
    for (int i = 0; i < NB; i++) {
      const float* xc = x + i * K + j0 * 2;
      const __m256 x0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), idx0),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), idx0), 0xF0);
      const __m256 x1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), idx1),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), idx1), 0xF0);
      acc[0][i] = _mm256_fmadd_ps(w0, x0, acc[0][i]);
      acc[1][i] = _mm256_fmadd_ps(w1, x1, acc[1][i]);
    }
  }
  if (j0 < nv) {  // a last 8 values (K an odd multiple of 16): an even group
    uint16_t p16;
    std::memcpy(&p16, pr + j0 / 4, 2);
    const __m256i idx = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(p16), shifts), three));
    const __m256 w = load8(vr + j0);
    __m256* a = acc[0];
    for (int i = 0; i < NB; i++) {
      const float* xc = x + i * K + j0 * 2;
      const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), idx),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), idx), 0xF0);
      a[i] = _mm256_fmadd_ps(w, xg, a[i]);
    }
  }
  for (int i = 0; i < NB; i++) store_reduce(_mm256_add_ps(acc[0][i], acc[1][i]), yr + i * N);
}


// One 16-row block row against NB batch rows (a compile-time count: the accumulators stay in registers).
template <int NB, typename W>
HP_AVX2 void tiered_row_avx2(const float* x, int64_t C, const int8_t* tr, const W* dense, const W* nmv,
    const uint32_t* nmp, const W* tkv, const uint8_t* tkp, int64_t k, int64_t d, int64_t n, int64_t t, float* yr,
    int64_t Np) {
  const int64_t Kp = C * 16;
  const __m256i sh_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i sh_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  __m256 lo[NB], hi[NB];
  float top[NB][16];
  for (int i = 0; i < NB; i++) {
    lo[i] = _mm256_setzero_ps();
    hi[i] = _mm256_setzero_ps();
    for (int j = 0; j < 16; j++) top[i][j] = 0.0f;
  }
  for (int64_t c = 0; c < C; c++) {
    const int tier = tr[c];
    const float* xc = x + c * 16;
    if (tier == 0) {
      const W* w = dense + d++ * 256;
      for (int j = 0; j < 16; j++) {
        const __m256 wl = load8(w + j * 16), wh = load8(w + j * 16 + 8);
        for (int i = 0; i < NB; i++) {
          const __m256 xv = _mm256_broadcast_ss(xc + i * Kp + j);
          lo[i] = _mm256_fmadd_ps(wl, xv, lo[i]);
          hi[i] = _mm256_fmadd_ps(wh, xv, hi[i]);
        }
      }
    } else if (tier == 1) {
      const W* w = nmv + n * 128;
      const uint32_t* p = nmp + n * 8;
      n++;
      for (int s = 0; s < 8; s++) {
        const __m256 wl = load8(w + s * 16), wh = load8(w + s * 16 + 8);
        const __m256i ps = _mm256_set1_epi32(static_cast<int>(p[s]));
        const __m256i pl = _mm256_srlv_epi32(ps, sh_lo), ph = _mm256_srlv_epi32(ps, sh_hi);
        for (int i = 0; i < NB; i++) {
          const __m256 xq = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xc + i * Kp + (s / 2) * 4));
          lo[i] = _mm256_fmadd_ps(wl, _mm256_permutevar_ps(xq, pl), lo[i]);
          hi[i] = _mm256_fmadd_ps(wh, _mm256_permutevar_ps(xq, ph), hi[i]);
        }
      }
    } else if (tier == 2) {
      topk_block<NB>(tkv + t * k, tkp + t * k, k, xc, Kp, top);
      t++;
    }
  }
  alignas(32) float a[NB][16];
  for (int i = 0; i < NB; i++) {
    _mm256_store_ps(a[i], lo[i]);
    _mm256_store_ps(a[i] + 8, hi[i]);
  }
  store_block_row<NB>(a, top, yr, Np);
}


template <typename W>
HP_AVX2 void unstructured_rows_avx2(const uint8_t* mask, const W* vals, int64_t nvals, const int64_t* rowptr,
                                    int64_t Kp, int64_t r0, int64_t r1, float* out) {
  const ExpandTable& T = expand_table();
  const int64_t mb = Kp / 8;
  W tail[16];
  for (int64_t r = r0; r < r1; r++) {
    const W* v = vals + rowptr[r];
    float* o = out + (r - r0) * Kp;
    for (int64_t c = 0; c < mb; c++) {
      const int m = mask[r * mb + c];
      _mm256_storeu_ps(o + c * 8, expand8(T, m, v, vals + nvals, tail));
      v += __builtin_popcount(m);
    }
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  return ok;
}

// ----------------------------------------------------------------------------- AVX-512

// 16 lanes: one zmm holds what the AVX2 code keeps in two ymm (unstructured: an even and an odd mask byte;
// 2:4: an even and an odd group of 8 values; tiered: the block's rows 0-7 and 8-15), so the sums are the same.
#define HP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bitalg,avx2,fma,popcnt,bmi2")))

// Decode reads each weight once, from DRAM (a model's matrices pass through the cache one after another). One
// core keeps too few of those reads in flight by itself, and the kernels' work per byte leaves them waiting, so
// the AVX-512 rows ask for the bytes PF ahead of each stream they read (1536 x 576 fp32, 2 threads, weights
// cycled through 700 MB as bench/kernels.py's decode-shape rows do: unstructured 121-126 -> 93-98 us, tiered
// 92-96 -> 84-89 us; distances of 0.5-8 KB tried, 4 KB best). A prefetch changes no result; past the end of an
// array it is a no-op. A macro: an inline function in its place lost the whole gain (GCC does not inline it
// across the target attributes).
constexpr int64_t PF = 4096;
#define HP_PREFETCH(p) _mm_prefetch(reinterpret_cast<const char*>(p) + PF, _MM_HINT_T0)

HP_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
HP_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
HP_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
HP_AVX512 inline __m512 load8z(const float* p) { return _mm512_maskz_loadu_ps(0xFF, p); }  // lanes 8-15 zero
HP_AVX512 inline __m512 load8z(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
HP_AVX512 inline __m512 load8z(const uint16_t* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(0xFF, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// The weights of two mask bytes: the next popcount(m) values to the lanes of m's set bits (an expand-load reads
// only those values, so it never passes the end of the matrix).
HP_AVX512 inline __m512 expand16(__mmask16 m, const float* src) { return _mm512_maskz_expandloadu_ps(m, src); }
// int8: a masked load of exactly popcount(m) bytes (never past the values' end), then a byte shuffle whose control
// is each mask byte's kByteRows row (the second byte's indices moved up by the first's count). The memory form of
// vpexpandb made the kernel 1.5x slower than with fp32 values on an AMD EPYC (Zen 4), its register form 1.1x.
struct ByteRows {
  alignas(64) uint8_t row[256][8];  // mask byte m: lane i's value index, 0x80 (zero) where m's bit i is clear
  ByteRows() {
    for (int m = 0; m < 256; m++)
      for (int i = 0, c = 0; i < 8; i++) {
        const bool kept = (m >> i) & 1;
        row[m][i] = kept ? static_cast<uint8_t>(c) : 0x80;
        c += kept;
      }
  }
};
const ByteRows kByteRows;

HP_AVX512 inline __m512 expand16(__mmask16 m, const int8_t* src) {
  const int lo = m & 0xFF, hi = m >> 8;
  const __m128i ctl = _mm_unpacklo_epi64(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kByteRows.row[lo])),
      _mm_add_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kByteRows.row[hi])), _mm_set1_epi8(static_cast<char>(_mm_popcnt_u32(lo)))));
  const __m128i packed = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << _mm_popcnt_u32(m)) - 1), src);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(packed, ctl)));
}
HP_AVX512 inline __m512 expand16(__mmask16 m, const uint16_t* src) {
  const __m256i h = _mm256_maskz_expandloadu_epi16(m, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
HP_AVX512 inline void store_reduce16(__m512 acc, float* out) {
  const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(acc), 1));
  store_reduce(_mm256_add_ps(_mm512_castps512_ps256(acc), hi), out);
}

// NR consecutive weight rows against NB batch rows: NR x NB independent accumulators (two rows for one batch
// row, so that consecutive FMAs do not wait on each other).
template <int NR, int NB, typename W>
HP_AVX512 __attribute__((always_inline)) inline void unstructured_row_avx512(const float* xr, int64_t Kp,
    const uint8_t* mr, const W* vals, const int64_t* rowptr, int64_t r, float* yr, int64_t N) {
  const int64_t mb = Kp / 8;
  __m512 acc[NR][NB];
  const W* v[NR];
  for (int q = 0; q < NR; q++) {
    v[q] = vals + rowptr[r + q];
    for (int i = 0; i < NB; i++) acc[q][i] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 2 <= mb; c += 2) {
    __m512 xv[NB];
    for (int i = 0; i < NB; i++) xv[i] = _mm512_loadu_ps(xr + i * Kp + c * 8);
    for (int q = 0; q < NR; q++) {
      uint16_t m;
      std::memcpy(&m, mr + (r + q) * mb + c, 2);
      if (q == NR - 1) HP_PREFETCH(v[q]);
      const __m512 w = expand16(m, v[q]);
      v[q] += _mm_popcnt_u32(m);
      for (int i = 0; i < NB; i++) acc[q][i] = _mm512_fmadd_ps(w, xv[i], acc[q][i]);
    }
  }
  if (c < mb) {  // an odd last byte: the even half only
    for (int q = 0; q < NR; q++) {
      const __m512 w = expand16(mr[(r + q) * mb + c], v[q]);
      for (int i = 0; i < NB; i++) acc[q][i] = _mm512_fmadd_ps(w, load8z(xr + i * Kp + c * 8), acc[q][i]);
    }
  }
  for (int q = 0; q < NR; q++)
    for (int i = 0; i < NB; i++) store_reduce16(acc[q][i], yr + i * N + r + q);
}

// int8 values, 64 columns a step (the 16-column step above spends most of its time building each shuffle
// control from two table rows): one byte permute moves the next popcount(m) values to the lanes of m's set bits.
// Its control, each column's count of m's set bits before it, is computed in registers from the 64-bit mask: the
// popcount of the column's mask byte below its bit, plus the popcounts of the bytes before it (one multiply sums
// them). The permute also orders the bytes so that byte b of 32-bit lane l holds column 16b + l: a shift and a
// mask then move each 16-column quarter's byte to the top of its lane, zeros below (no cross-lane widening, which
// competes with the permutes for the shuffle unit). As the AVX2 step's kTop rows, that lane converts exactly to
// the value times 2^24, the row's total is scaled back by 2^-24, and the quarters are multiplied in column order,
// as the 16-column step does, so the sums are bit for bit the same (but for the subnormal and overflow bounds
// that kTop names). 50% kept, batch 1, 2 threads, AMD EPYC (Zen 4): 1.25-1.31x the 16-column step at 11008 x 4096
// from DRAM, 1536 x 576 and 512 x 4096 in cache; the top-byte widening in place of sign-extending shifts,
// 1.04-1.09x more (the kernels results page).
// On Intel the step takes another route to the same bytes (XB): vpexpandb moves the values to the set bits in
// column order, one constant permute then orders the bytes as above; Intel runs the expand as two shuffle-port
// uops, fewer than the control's. Old and new in one process (Intel Xeon with AMX, 2 threads, batch 1):
// 1.21-1.31x, in cache and from DRAM. Not yet measured on an AMD CPU, which keeps the computed control;
// `int8_step` forces either (the tests run both).
struct Expand64 {
  alignas(64) uint8_t byte_of[64], below[64], bit[64];  // byte j's column: its mask byte, the bits below it, its bit
  alignas(64) uint8_t perm[64];                         // byte j's column (XB)
  Expand64() {
    for (int j = 0; j < 64; j++) {
      const int p = 16 * (j % 4) + j / 4;  // byte j = 4l + b holds column 16b + l
      byte_of[j] = static_cast<uint8_t>(p / 8);
      below[j] = static_cast<uint8_t>((1u << (p % 8)) - 1);
      bit[j] = static_cast<uint8_t>(1u << (p % 8));
      perm[j] = static_cast<uint8_t>(p);
    }
  }
};
const Expand64 kExpand64;

bool int8_step_xb() {
  static const bool intel = __builtin_cpu_is("intel");
  const int s = g_int8_step.load(std::memory_order_relaxed);
  return s == 2 || (s == 0 && intel);
}

// CHECK: read exactly popcount(m) values (the matrix's last rows); else 64 bytes, of which the permute keeps those.
// XB: byte_of holds kExpand64.perm, below and bit are unused.
template <bool CHECK, bool XB>
HP_AVX512 __attribute__((always_inline)) inline __m512i expand64(uint64_t m, const int8_t* src, __m512i byte_of,
                                                                 __m512i below, __m512i bit) {
  if constexpr (XB) {
    const __m512i vals = CHECK ? _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, static_cast<unsigned>(_mm_popcnt_u64(m))), src)
                               : _mm512_loadu_si512(src);
    return _mm512_permutexvar_epi8(byte_of, _mm512_maskz_expand_epi8(m, vals));
  }
  const __m128i mv = _mm_cvtsi64_si128(static_cast<long long>(m));
  const uint64_t counts = static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_popcnt_epi8(mv)));  // per mask byte
  const __m128i before = _mm_cvtsi64_si128(static_cast<long long>((counts * 0x0101010101010101ull) << 8));
  const __m512i mbyte = _mm512_permutexvar_epi8(byte_of, _mm512_castsi128_si512(mv));
  const __m512i in_byte = _mm512_popcnt_epi8(_mm512_and_si512(mbyte, below));
  const __m512i ctl = _mm512_add_epi8(in_byte, _mm512_permutexvar_epi8(byte_of, _mm512_castsi128_si512(before)));
  const __m512i vals = CHECK ? _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, static_cast<unsigned>(_mm_popcnt_u64(m))), src)
                             : _mm512_loadu_si512(src);
  return _mm512_maskz_permutexvar_epi8(_mm512_test_epi8_mask(mbyte, bit), ctl, vals);
}

template <int NR, int NB, bool CHECK, bool XB>
HP_AVX512 __attribute__((always_inline)) inline void unstructured_row64(const float* xr, int64_t Kp,
    const uint8_t* mr, const int8_t* vals, const int64_t* rowptr, int64_t r, float* yr, int64_t N) {
  const int64_t mb = Kp / 8;
  const __m512i byte_of = _mm512_load_si512(XB ? kExpand64.perm : kExpand64.byte_of);
  const __m512i below = _mm512_load_si512(kExpand64.below);
  const __m512i bit = _mm512_load_si512(kExpand64.bit);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFF000000u));
  const __m512 up = _mm512_set1_ps(0x1p24f);  // the 16-column tail's values, scaled as the quarters are
  __m512 acc[NR][NB];
  const int8_t* v[NR];
  for (int q = 0; q < NR; q++) {
    v[q] = vals + rowptr[r + q];
    for (int i = 0; i < NB; i++) acc[q][i] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 8 <= mb; c += 8) {
    for (int q = 0; q < NR; q++) {
      uint64_t m;
      std::memcpy(&m, mr + (r + q) * mb + c, 8);
      if (q == NR - 1) HP_PREFETCH(v[q]);
      const __m512i w = expand64<CHECK, XB>(m, v[q], byte_of, below, bit);
      v[q] += _mm_popcnt_u64(m);
      const __m512i wq[4] = {_mm512_slli_epi32(w, 24),  // columns 0-15, each value times 2^24
                             _mm512_and_si512(_mm512_slli_epi32(w, 16), top), _mm512_and_si512(_mm512_slli_epi32(w, 8), top),
                             _mm512_and_si512(w, top)};
      for (int s = 0; s < 4; s++) {
        const __m512 ws = _mm512_cvtepi32_ps(wq[s]);
        for (int i = 0; i < NB; i++)
          acc[q][i] = _mm512_fmadd_ps(ws, _mm512_loadu_ps(xr + i * Kp + c * 8 + s * 16), acc[q][i]);
      }
    }
  }
  for (; c + 2 <= mb; c += 2)  // the last 16-56 columns: the 16-column step
    for (int q = 0; q < NR; q++) {
      uint16_t m;
      std::memcpy(&m, mr + (r + q) * mb + c, 2);
      const __m512 w = _mm512_mul_ps(expand16(m, v[q]), up);
      v[q] += _mm_popcnt_u32(m);
      for (int i = 0; i < NB; i++) acc[q][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + i * Kp + c * 8), acc[q][i]);
    }
  if (c < mb)  // an odd last byte: the even half only
    for (int q = 0; q < NR; q++) {
      const __m512 w = _mm512_mul_ps(expand16(mr[(r + q) * mb + c], v[q]), up);
      for (int i = 0; i < NB; i++) acc[q][i] = _mm512_fmadd_ps(w, load8z(xr + i * Kp + c * 8), acc[q][i]);
    }
  for (int q = 0; q < NR; q++)
    for (int i = 0; i < NB; i++) {
      store_reduce16(acc[q][i], yr + i * N + r + q);
      yr[i * N + r + q] *= kTopScale;
    }
}

// Rows [n0, n1) by the 64-column int8 step (XB: its Intel form); a 64-byte read at a row's last step stays inside
// the values, else the step reads exactly the row's.
template <int NB, bool XB>
HP_AVX512 void unstructured_rows64(const float* xr, int64_t Kp, const uint8_t* mask, const int8_t* vals,
                                   int64_t nvals, const int64_t* rowptr, int64_t n0, int64_t n1, float* yr, int64_t N) {
  int64_t r = n0;
  if (NB == 1)
    for (; r + 2 <= n1; r += 2) {
      if (rowptr[r + 2] + 64 <= nvals) unstructured_row64<2, NB, false, XB>(xr, Kp, mask, vals, rowptr, r, yr, N);
      else unstructured_row64<2, NB, true, XB>(xr, Kp, mask, vals, rowptr, r, yr, N);
    }
  for (; r < n1; r++) {
    if (rowptr[r + 1] + 64 <= nvals) unstructured_row64<1, NB, false, XB>(xr, Kp, mask, vals, rowptr, r, yr, N);
    else unstructured_row64<1, NB, true, XB>(xr, Kp, mask, vals, rowptr, r, yr, N);
  }
}

template <int NB, typename W>
HP_AVX512 void unstructured_pass_avx512(const float* xr, int64_t Kp, const uint8_t* mask, const W* vals,
                                        int64_t nvals, const int64_t* rowptr, int64_t n0, int64_t n1, float* yr,
                                        int64_t N) {
  int64_t r = n0;
  if constexpr (std::is_same_v<W, int8_t>) {
    if (int8_step_xb()) unstructured_rows64<NB, true>(xr, Kp, mask, vals, nvals, rowptr, n0, n1, yr, N);
    else unstructured_rows64<NB, false>(xr, Kp, mask, vals, nvals, rowptr, n0, n1, yr, N);
    return;
  }
  if (NB == 1)
    for (; r + 2 <= n1; r += 2) unstructured_row_avx512<2, NB>(xr, Kp, mask, vals, rowptr, r, yr, N);
  for (; r < n1; r++) unstructured_row_avx512<1, NB>(xr, Kp, mask, vals, rowptr, r, yr, N);
}


// 16 kept values (8 groups, 32 columns) per step: one two-source permute gathers their inputs.
template <int NB, typename W>
HP_AVX512 void nm24_row_avx512(const float* x, int64_t K, const W* vr, const uint8_t* pr, float* yr, int64_t N) {
  const int64_t nv = K / 2;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[NB];
  for (int i = 0; i < NB; i++) acc[i] = _mm512_setzero_ps();
  int64_t j0 = 0;
  for (; j0 + 16 <= nv; j0 += 16) {
    uint32_t p32;
    std::memcpy(&p32, pr + j0 / 4, 4);
    const __m512i idx = _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(p32), shifts), three));
    HP_PREFETCH(vr + j0);
    if ((j0 & 63) == 0) HP_PREFETCH(pr + j0 / 4);
    const __m512 w = load16(vr + j0);
    for (int i = 0; i < NB; i++) {
      const float* xc = x + i * K + j0 * 2;
      acc[i] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(xc), idx, _mm512_loadu_ps(xc + 16)), acc[i]);
    }
  }
  if (j0 < nv) {  // 8 values left (K % 32 == 16): the even half only
    uint16_t p16;
    std::memcpy(&p16, pr + j0 / 4, 2);
    const __m512i idx = _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(p16), shifts), three));
    const __m512 w = load8z(vr + j0);
    for (int i = 0; i < NB; i++)
      acc[i] = _mm512_fmadd_ps(w, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x + i * K + j0 * 2)), acc[i]);
  }
  for (int i = 0; i < NB; i++) store_reduce16(acc[i], yr + i * N);
}


// One 16-row block row: lane i is the block's row i.
template <int NB, typename W>
HP_AVX512 void tiered_row_avx512(const float* x, int64_t C, const int8_t* tr, const W* dense, const W* nmv,
    const uint32_t* nmp, const W* tkv, const uint8_t* tkp, int64_t k, int64_t d, int64_t n, int64_t t, float* yr,
    int64_t Np) {
  const int64_t Kp = C * 16;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __m512 acc[NB];
  float top[NB][16];
  for (int i = 0; i < NB; i++) {
    acc[i] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) top[i][j] = 0.0f;
  }
  for (int64_t c = 0; c < C; c++) {
    const int tier = tr[c];
    const float* xc = x + c * 16;
    if (tier == 0) {
      const W* w = dense + d++ * 256;
      for (int j = 0; j < 16; j++) {
        if (j * 16 * sizeof(W) % 64 == 0) HP_PREFETCH(w + j * 16);  // one per cache line
        const __m512 wj = load16(w + j * 16);
        for (int i = 0; i < NB; i++) acc[i] = _mm512_fmadd_ps(wj, _mm512_set1_ps(xc[i * Kp + j]), acc[i]);
      }
    } else if (tier == 1) {
      const W* w = nmv + n * 128;
      const uint32_t* p = nmp + n * 8;
      n++;
      if (n % 2 == 0) HP_PREFETCH(p);
      for (int s = 0; s < 8; s++) {
        if (s * 16 * sizeof(W) % 64 == 0) HP_PREFETCH(w + s * 16);
        const __m512 ws = load16(w + s * 16);
        const __m512i ps = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(p[s])), shifts);
        for (int i = 0; i < NB; i++) {
          const __m512 xq = _mm512_broadcast_f32x4(_mm_loadu_ps(xc + i * Kp + (s / 2) * 4));
          acc[i] = _mm512_fmadd_ps(ws, _mm512_permutevar_ps(xq, ps), acc[i]);
        }
      }
    } else if (tier == 2) {
      topk_block<NB>(tkv + t * k, tkp + t * k, k, xc, Kp, top);
      t++;
    }
  }
  alignas(64) float a[NB][16];
  for (int i = 0; i < NB; i++) _mm512_store_ps(a[i], acc[i]);
  store_block_row<NB>(a, top, yr, Np);
}


// The drivers of both vector paths: a thread's rows (block rows), then passes of up to BC_WIDE (AVX-512) or BC
// (AVX2) batch rows; WIDE picks the AVX-512 functions, else the AVX2 ones. Passes of 8 rather than 4 on AVX-512,
// old and new in one process (Intel Xeon, 2 threads, 11008 x 4096 fp32 from DRAM, the sparse kernel at 5-64 rows):
// 1.01-1.24x, the most at 5-8 rows; with int8 values 0.94-1.5x, noisy (the kernels results page, 2026-12-08).
template <bool WIDE, typename W>
void unstructured_fast(const float* x, int64_t B, int64_t Kp, const uint8_t* mask, const W* vals, int64_t nvals,
                       const int64_t* rowptr, int64_t n0, int64_t n1, int64_t N, float* y) {
  const ExpandTable& T = expand_table();
  W tail[16];
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {  // rows in chunks that stay in cache over the batch passes
    const int64_t r1 = std::min<int64_t>(r0 + 16, n1);
    batch_passes<WIDE ? BC_WIDE : BC>(B, [&](auto nb, int64_t b0) {
      constexpr int NB = decltype(nb)::value;
      if constexpr (WIDE) unstructured_pass_avx512<NB>(x + b0 * Kp, Kp, mask, vals, nvals, rowptr, r0, r1, y + b0 * N, N);
      else unstructured_pass_avx2<NB>(T, x + b0 * Kp, Kp, mask, vals, vals + nvals, rowptr, r0, r1, tail, y + b0 * N, N);
    });
  }
}

template <bool WIDE, typename W>
void nm24_fast(const float* x, int64_t B, int64_t K, const W* vals, const uint8_t* pos, int64_t n0, int64_t n1,
               int64_t N, float* y) {
  const int64_t nv = K / 2;
  for (int64_t r = n0; r < n1; r++) {
    batch_passes<WIDE ? BC_WIDE : BC>(B, [&](auto nb, int64_t b0) {
      constexpr int NB = decltype(nb)::value;
      if constexpr (WIDE) nm24_row_avx512<NB>(x + b0 * K, K, vals + r * nv, pos + r * (nv / 4), y + b0 * N + r, N);
      else nm24_row_avx2<NB>(x + b0 * K, K, vals + r * nv, pos + r * (nv / 4), y + b0 * N + r, N);
    });
  }
}

template <bool WIDE, typename W>
void tiered_fast(const float* x, int64_t B, int64_t C, const int8_t* tiers, const W* dense, const W* nmv,
                 const uint32_t* nmp, const W* tkv, const uint8_t* tkp, int64_t k, const int64_t* off, int64_t r0,
                 int64_t r1, int64_t Np, float* y) {
  const int64_t Kp = C * 16;
  for (int64_t R = r0; R < r1; R++) {
    const int64_t d = off[R * 3], n = off[R * 3 + 1], t = off[R * 3 + 2];
    batch_passes<WIDE ? BC_WIDE : BC>(B, [&](auto nb, int64_t b0) {
      constexpr int NB = decltype(nb)::value;
      const float* xb = x + b0 * Kp;
      float* yr = y + b0 * Np + R * 16;
      if constexpr (WIDE) tiered_row_avx512<NB>(xb, C, tiers + R * C, dense, nmv, nmp, tkv, tkp, k, d, n, t, yr, Np);
      else tiered_row_avx2<NB>(xb, C, tiers + R * C, dense, nmv, nmp, tkv, tkp, k, d, n, t, yr, Np);
    });
  }
}

// ----------------------------------------------------------------------------- AVX-512 GEMM for large batches
//
// From a few dozen batch rows on (prefill), re-reading the packed weights for every 4-8 batch rows costs more than
// decoding them once. So each thread decodes 16 weight rows at a time (one block row for tiered) into a buffer
// that stays in L2, and multiplies it against x^T, packed once per call in tiles of 48 batch rows:
// c[i][m] += W(i, k) * xT[k][m], 8 weight rows x 48 batch rows in 24 registers, W(i, k) broadcast from the buffer.
// Each (row, batch row) pair accumulates its products in k order with one FMA each, in fp32.
constexpr int GR = 16;    // weight rows decoded at a time
constexpr int GKC = 512;  // k per pass over the buffers
constexpr int GG = 8;     // chunks of 16 rows decoded before the passes over x^T (each k-slice of x^T read once per 128 rows)
constexpr int GNR = 8, GNM = 3;  // register tile: GNR weight rows x GNM*16 batch rows
static_assert(GNM <= 3, "batch tiles of 16, 32 or 48 rows");
// Row stride of a row-major buffer: one cache line more than the row, so that 16 rows 16 KB apart do not all
// fall into the same L1 set (at 512 batch rows it lifted the row-major layouts from about 0.8x dense to 0.9-1.0x,
// in noisy runs).
inline int64_t gemm_ld(int64_t Kp) { return Kp + 16; }

// NR rows x NM*16 batch rows; w(i, k) = w[i * rs + k]; xt[k * NM*16 + m]; c[i * ldc + m].
template <int NR, int NM>
HP_AVX512 void gemm_tile(const float* w, int64_t rs, const float* xt, int64_t kc, float* c, int64_t ldc) {
  __m512 acc[NR][NM];
  for (int i = 0; i < NR; i++)
    for (int j = 0; j < NM; j++) acc[i][j] = _mm512_loadu_ps(c + i * ldc + j * 16);
  for (int64_t k = 0; k < kc; k++) {
    __m512 b[NM];
    for (int j = 0; j < NM; j++) b[j] = _mm512_loadu_ps(xt + k * NM * 16 + j * 16);
    for (int i = 0; i < NR; i++) {
      const __m512 a = _mm512_set1_ps(w[i * rs + k]);
      for (int j = 0; j < NM; j++) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; i++)
    for (int j = 0; j < NM; j++) _mm512_storeu_ps(c + i * ldc + j * 16, acc[i][j]);
}

// One row of a bitmask-packed matrix (mask bytes mr, its values from v), dense into o[0 .. mb * 8).
template <typename W>
HP_AVX512 void unstructured_row_dec_avx512(const uint8_t* mr, const W* v, int64_t mb, float* o) {
  int64_t c = 0;
  for (; c + 2 <= mb; c += 2) {
    uint16_t m;
    std::memcpy(&m, mr + c, 2);
    _mm512_storeu_ps(o + c * 8, expand16(m, v));
    v += _mm_popcnt_u32(m);
  }
  if (c < mb) _mm512_mask_storeu_ps(o + c * 8, 0xFF, expand16(mr[c], v));
}

// Row-major decoders: rows r .. r+rows of the matrix into out[GR][Kp], rows past `rows` zero.
template <typename W>
HP_AVX512 void unstructured_rows_avx512(const uint8_t* mask, const W* vals, const int64_t* rowptr, int64_t Kp,
                                        int64_t r, int64_t rows, float* out) {
  const int64_t mb = Kp / 8;
  for (int64_t q = 0; q < rows; q++)
    unstructured_row_dec_avx512(mask + (r + q) * mb, vals + rowptr[r + q], mb, out + q * gemm_ld(Kp));
  for (int64_t q = rows; q < GR; q++) std::memset(out + q * gemm_ld(Kp), 0, Kp * sizeof(float));
}

// One row of a 2:4-packed matrix (nv values from v, their positions from p), dense into o[0 .. 2 * nv).
template <typename W>
HP_AVX512 void nm24_row_dec_avx512(const W* v, const uint8_t* p, int64_t nv, float* o) {
  // lane l is column 4g + c of a 16-column step (g = l / 4): the step's values 2g and 2g+1 and their positions
  const __m512i ev = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  const __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t j0 = 0; j0 < nv; j0 += 8) {  // 8 values, 16 columns
    uint16_t p16;
    std::memcpy(&p16, p + j0 / 4, 2);
    const __m512 w = load8z(v + j0);
    const __m512i pw = _mm512_set1_epi32(p16);
    const __m512i pe = _mm512_and_si512(_mm512_srlv_epi32(pw, _mm512_add_epi32(ev, ev)), three);
    const __m512i po = _mm512_and_si512(_mm512_srlv_epi32(pw, _mm512_add_epi32(od, od)), three);
    __m512 d = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(pe, col), _mm512_permutexvar_ps(ev, w));
    d = _mm512_mask_mov_ps(d, _mm512_cmpeq_epi32_mask(po, col), _mm512_permutexvar_ps(od, w));
    _mm512_storeu_ps(o + j0 * 2, d);
  }
}

template <typename W>
HP_AVX512 void nm24_rows_avx512(const W* vals, const uint8_t* pos, int64_t K, int64_t r, int64_t rows, float* out) {
  const int64_t nv = K / 2;
  for (int64_t q = 0; q < rows; q++) nm24_row_dec_avx512(vals + (r + q) * nv, pos + (r + q) * (nv / 4), nv, out + q * gemm_ld(K));
  for (int64_t q = rows; q < GR; q++) std::memset(out + q * gemm_ld(K), 0, K * sizeof(float));
}

// The tiered GEMM skips what a block row's top-k and empty blocks would cost in the dense tile (its panel:
// tiered_panel, below). A dense block and a 2:4 block written k-major, column j's 16 rows at o + j * ld (the panel:
// ld 16; a transposed strip for the dense-strips route: ld its width), AVX-512:
template <typename W>
HP_AVX512 void dense_block_avx512(const W* w, float* o, int64_t ld) {
  for (int j = 0; j < 16; j++) _mm512_storeu_ps(o + j * ld, load16(w + j * 16));
}
template <typename W>
HP_AVX512 void nm_block_avx512(const W* w, const uint32_t* p, float* o, int64_t ld) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i three = _mm512_set1_epi32(3);
  for (int g = 0; g < 4; g++) {  // value columns 2g and 2g+1 fill columns 4g .. 4g+3
    const __m512 we = load16(w + 2 * g * 16), wo = load16(w + (2 * g + 1) * 16);
    const __m512i pe = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(p[2 * g])), shifts), three);
    const __m512i po = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(p[2 * g + 1])), shifts), three);
    for (int cc = 0; cc < 4; cc++) {
      const __m512i cv = _mm512_set1_epi32(cc);
      __m512 col = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(pe, cv), we);
      col = _mm512_mask_mov_ps(col, _mm512_cmpeq_epi32_mask(po, cv), wo);
      _mm512_storeu_ps(o + (4 * g + cc) * ld, col);
    }
  }
}

// NR panel rows x NM*16 batch rows over nb blocks of a panel: w(i, column j of block b) = w[b * 256 + j * 16 + i];
// block b reads x^T from its block column cols[b].
template <int NR, int NM>
HP_AVX512 void gemm_tile_blocks(const float* w, const int32_t* cols, int64_t nb, const float* xt, float* c,
                                int64_t ldc) {
  __m512 acc[NR][NM];
  for (int i = 0; i < NR; i++)
    for (int j = 0; j < NM; j++) acc[i][j] = _mm512_loadu_ps(c + i * ldc + j * 16);
  for (int64_t b = 0; b < nb; b++) {
    const float* wb = w + b * 256;
    const float* xb = xt + static_cast<int64_t>(cols[b]) * 16 * NM * 16;
    for (int kk = 0; kk < 16; kk++) {
      __m512 v[NM];
      for (int j = 0; j < NM; j++) v[j] = _mm512_loadu_ps(xb + kk * NM * 16 + j * 16);
      for (int i = 0; i < NR; i++) {
        const __m512 a = _mm512_set1_ps(wb[kk * 16 + i]);
        for (int j = 0; j < NM; j++) acc[i][j] = _mm512_fmadd_ps(a, v[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < NR; i++)
    for (int j = 0; j < NM; j++) _mm512_storeu_ps(c + i * ldc + j * 16, acc[i][j]);
}

// ----- The packed GEMM's AVX2 pieces (8 lanes, 16 registers): the same buffers, x^T tiles and sums as AVX-512's,
// through a 4 weight rows x 16 batch rows register tile (8 accumulators), so the results are the same bit for bit.
constexpr int GNR2 = 4;

// 4 rows x NM*16 batch rows, 16 at a time; w(i, k) = w[i * rs + k]; xt[k * NM*16 + m]; c[i * ldc + m].
template <int NM>
HP_AVX2 void gemm_tile_avx2(const float* w, int64_t rs, const float* xt, int64_t kc, float* c, int64_t ldc) {
  constexpr int XW = NM * 16;
  for (int j = 0; j < NM; j++) {
    __m256 acc[GNR2][2];
    for (int i = 0; i < GNR2; i++)
      for (int h = 0; h < 2; h++) acc[i][h] = _mm256_loadu_ps(c + i * ldc + j * 16 + h * 8);
    for (int64_t k = 0; k < kc; k++) {
      const __m256 b0 = _mm256_loadu_ps(xt + k * XW + j * 16), b1 = _mm256_loadu_ps(xt + k * XW + j * 16 + 8);
      for (int i = 0; i < GNR2; i++) {
        const __m256 a = _mm256_broadcast_ss(w + i * rs + k);
        acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
      }
    }
    for (int i = 0; i < GNR2; i++)
      for (int h = 0; h < 2; h++) _mm256_storeu_ps(c + i * ldc + j * 16 + h * 8, acc[i][h]);
  }
}

// gemm_tile_blocks on AVX2: 4 panel rows x NM*16 batch rows over nb blocks.
template <int NM>
HP_AVX2 void gemm_tile_blocks_avx2(const float* w, const int32_t* cols, int64_t nb, const float* xt, float* c,
                                   int64_t ldc) {
  constexpr int XW = NM * 16;
  for (int j = 0; j < NM; j++) {
    __m256 acc[GNR2][2];
    for (int i = 0; i < GNR2; i++)
      for (int h = 0; h < 2; h++) acc[i][h] = _mm256_loadu_ps(c + i * ldc + j * 16 + h * 8);
    for (int64_t b = 0; b < nb; b++) {
      const float* wb = w + b * 256;
      const float* xb = xt + static_cast<int64_t>(cols[b]) * 16 * XW + j * 16;
      for (int kk = 0; kk < 16; kk++) {
        const __m256 b0 = _mm256_loadu_ps(xb + kk * XW), b1 = _mm256_loadu_ps(xb + kk * XW + 8);
        for (int i = 0; i < GNR2; i++) {
          const __m256 a = _mm256_broadcast_ss(wb + kk * 16 + i);
          acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
      }
    }
    for (int i = 0; i < GNR2; i++)
      for (int h = 0; h < 2; h++) _mm256_storeu_ps(c + i * ldc + j * 16 + h * 8, acc[i][h]);
  }
}

HP_AVX2 void topk_adds_avx2(const float* wg, const int32_t* xg, int64_t nt, const float* xt, int64_t Kp, int64_t Mp,
                            float* ag) {
  for (int64_t e = 0; e < nt; e++) {
    const __m256 a = _mm256_set1_ps(wg[e]);
    const int64_t col = xg[e] >> 4;
    float* c = ag + (xg[e] & 15) * Mp;
    for (int64_t m0 = 0; m0 < Mp; m0 += GNM * 16) {
      const int64_t w = std::min<int64_t>(GNM * 16, Mp - m0);
      const float* xr = xt + m0 * Kp + col * w;
      for (int64_t j = 0; j < w; j += 8)
        _mm256_storeu_ps(c + m0 + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(xr + j), _mm256_loadu_ps(c + m0 + j)));
    }
  }
}

// Row-major decoders into the GEMM's buffers, AVX2: rows r .. r+rows into out[GR][gemm_ld], rows past `rows` zero.
template <typename W>
HP_AVX2 void unstructured_buf_avx2(const uint8_t* mask, const W* vals, int64_t nvals, const int64_t* rowptr,
                                   int64_t Kp, int64_t r, int64_t rows, float* out) {
  for (int64_t q = 0; q < rows; q++) unstructured_rows_avx2(mask, vals, nvals, rowptr, Kp, r + q, r + q + 1, out + q * gemm_ld(Kp));
  for (int64_t q = rows; q < GR; q++) std::memset(out + q * gemm_ld(Kp), 0, Kp * sizeof(float));
}

// One row of a 2:4-packed matrix, dense into o[0 .. 2 * nv), AVX2 (as nm24_row_dec_avx512).
template <typename W>
HP_AVX2 void nm24_row_dec_avx2(const W* v, const uint8_t* p, int64_t nv, float* o) {
  // 8 values fill 16 columns; lane l of a half is column 4g + (l % 4) of group g: values 2g and 2g+1
  const __m256i ev[2] = {_mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)};
  const __m256i one = _mm256_set1_epi32(1), three = _mm256_set1_epi32(3);
  const __m256i col = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
  for (int64_t j0 = 0; j0 < nv; j0 += 8) {
    uint16_t p16;
    std::memcpy(&p16, p + j0 / 4, 2);
    const __m256 w = load8(v + j0);
    const __m256i pw = _mm256_set1_epi32(p16);
    for (int h = 0; h < 2; h++) {
      const __m256i od = _mm256_add_epi32(ev[h], one);
      const __m256i pe = _mm256_and_si256(_mm256_srlv_epi32(pw, _mm256_add_epi32(ev[h], ev[h])), three);
      const __m256i po = _mm256_and_si256(_mm256_srlv_epi32(pw, _mm256_add_epi32(od, od)), three);
      __m256 d = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(w, ev[h]),
                                  _mm256_castsi256_ps(_mm256_cmpeq_epi32(pe, col)));
      d = _mm256_blendv_ps(d, _mm256_permutevar8x32_ps(w, od), _mm256_castsi256_ps(_mm256_cmpeq_epi32(po, col)));
      _mm256_storeu_ps(o + j0 * 2 + h * 8, d);
    }
  }
}

template <typename W>
HP_AVX2 void nm24_buf_avx2(const W* vals, const uint8_t* pos, int64_t K, int64_t r, int64_t rows, float* out) {
  const int64_t nv = K / 2;
  for (int64_t q = 0; q < rows; q++) nm24_row_dec_avx2(vals + (r + q) * nv, pos + (r + q) * (nv / 4), nv, out + q * gemm_ld(K));
  for (int64_t q = rows; q < GR; q++) std::memset(out + q * gemm_ld(K), 0, K * sizeof(float));
}

// The AVX2 block writers of the tiered GEMM's panel (as dense_block_avx512, nm_block_avx512).
template <typename W>
HP_AVX2 void dense_block_avx2(const W* w, float* o, int64_t ld) {
  for (int j = 0; j < 16; j++) {
    _mm256_storeu_ps(o + j * ld, load8(w + j * 16));
    _mm256_storeu_ps(o + j * ld + 8, load8(w + j * 16 + 8));
  }
}
template <typename W>
HP_AVX2 void nm_block_avx2(const W* w, const uint32_t* p, float* o, int64_t ld) {
  const __m256i shifts[2] = {_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                             _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)};
  const __m256i three = _mm256_set1_epi32(3);
  for (int g = 0; g < 4; g++) {  // value columns 2g and 2g+1 fill columns 4g .. 4g+3
    for (int h = 0; h < 2; h++) {  // rows 8h .. 8h+7
      const __m256 we = load8(w + 2 * g * 16 + h * 8), wo = load8(w + (2 * g + 1) * 16 + h * 8);
      const __m256i pe = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(p[2 * g])), shifts[h]), three);
      const __m256i po = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(p[2 * g + 1])), shifts[h]), three);
      for (int cc = 0; cc < 4; cc++) {
        const __m256i cv = _mm256_set1_epi32(cc);
        __m256 v = _mm256_blendv_ps(_mm256_setzero_ps(), we, _mm256_castsi256_ps(_mm256_cmpeq_epi32(pe, cv)));
        v = _mm256_blendv_ps(v, wo, _mm256_castsi256_ps(_mm256_cmpeq_epi32(po, cv)));
        _mm256_storeu_ps(o + (4 * g + cc) * ld + h * 8, v);
      }
    }
  }
}

// The tiered GEMM's panel of one block row, for either instruction set (its dense and 2:4 block writers): the
// dense and 2:4 blocks decoded k-major one after another (out[b * 256 + j * 16 + i] = row i, column j of the b-th
// such block, cols[b] its block column, ascending), and each top-k weight as its value and (input column << 4 |
// row). A top-k block (k of 256 weights) then costs k broadcast FMAs per 16 batch rows, not a dense block's 256.
template <typename W>
void tiered_panel(int64_t C, const int8_t* tr, const W* dense, const W* nmv, const uint32_t* nmp, const W* tkv,
                  const uint8_t* tkp, int64_t k, int64_t d, int64_t n, int64_t t, float* out, int32_t* cols,
                  int64_t& nb, float* tkw, int32_t* tkx, int64_t& nt, void (*dense_block)(const W*, float*, int64_t),
                  void (*nm_block)(const W*, const uint32_t*, float*, int64_t)) {
  nb = nt = 0;
  for (int64_t c = 0; c < C; c++) {
    const int tier = tr[c];
    if (tier == 2) {
      const W* w = tkv + t * k;
      const uint8_t* p = tkp + t * k;
      t++;
      for (int64_t e = 0; e < k; e++, nt++) {
        tkw[nt] = to_f(w[e]);
        tkx[nt] = static_cast<int32_t>(((c * 16 + (p[e] & 15)) << 4) | (p[e] >> 4));
      }
      continue;
    }
    if (tier != 0 && tier != 1) continue;  // an empty block
    cols[nb] = static_cast<int32_t>(c);
    if (tier == 0) dense_block(dense + d++ * 256, out + nb * 256, 16);
    else nm_block(nmv + n * 128, nmp + n * 8, out + nb * 256, 16), n++;
    nb++;
  }
}

// Each top-k weight (value wg[e], input column xg[e] >> 4, panel row xg[e] & 15) times its column of x^T, added
// to the row's sums: one broadcast FMA per 16 batch rows.
HP_AVX512 void topk_adds_avx512(const float* wg, const int32_t* xg, int64_t nt, const float* xt, int64_t Kp,
                                int64_t Mp, float* ag) {
  for (int64_t e = 0; e < nt; e++) {
    const __m512 a = _mm512_set1_ps(wg[e]);
    const int64_t col = xg[e] >> 4;
    float* c = ag + (xg[e] & 15) * Mp;
    for (int64_t m0 = 0; m0 < Mp; m0 += GNM * 16) {
      const int64_t w = std::min<int64_t>(GNM * 16, Mp - m0);
      const float* xr = xt + m0 * Kp + col * w;
      for (int64_t j = 0; j < w; j += 16)
        _mm512_storeu_ps(c + m0 + j, _mm512_fmadd_ps(a, _mm512_loadu_ps(xr + j), _mm512_loadu_ps(c + m0 + j)));
    }
  }
}

// Block rows [R0, R1) against every batch row, GG at a time (a k-slice of x^T read once per GG block rows): the
// panels' blocks in k-slices of GKC columns through the register tile, then the top-k weights, then y. WIDE: the
// AVX-512 tiles (8 weight rows x 48 batch rows), else AVX2's (4 x 16); the sums are the same, bit for bit.
template <bool WIDE, typename Panel>
void tiered_gemm_rows(const float* xt, int64_t M, int64_t Mp, int64_t C, int64_t k, float* y, int64_t ldy,
                                int64_t R0, int64_t R1, Panel& panel) {
  const int64_t Kp = C * 16;
  std::vector<float> buf(static_cast<size_t>(GG * C * 256)), acc(static_cast<size_t>(GG * GR * Mp));
  std::vector<float> tkw(static_cast<size_t>(std::max<int64_t>(1, GG * C * k)));
  std::vector<int32_t> cols(static_cast<size_t>(GG * C)), tkx(tkw.size());
  int64_t nb[GG], nt[GG], next[GG];
  for (int64_t g0 = R0; g0 < R1; g0 += GG) {
    const int64_t ng = std::min<int64_t>(GG, R1 - g0);
    for (int64_t g = 0; g < ng; g++) {
      panel(g0 + g, buf.data() + g * C * 256, cols.data() + g * C, nb[g], tkw.data() + g * C * k,
            tkx.data() + g * C * k, nt[g]);
      next[g] = 0;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < Kp; k0 += GKC) {
      const int64_t chi = (k0 + GKC) / 16;  // block columns below chi are in this slice
      for (int64_t g = 0; g < ng; g++) {
        const int32_t* cg = cols.data() + g * C;
        const int64_t b0 = next[g];
        int64_t b1 = b0;
        while (b1 < nb[g] && cg[b1] < chi) b1++;
        next[g] = b1;
        if (b1 == b0) continue;
        const float* wg = buf.data() + g * C * 256 + b0 * 256;
        float* ag = acc.data() + g * GR * Mp;
        for (int64_t m0 = 0; m0 < Mp; m0 += GNM * 16) {
          const int64_t nm = std::min<int64_t>(GNM, (Mp - m0) / 16);
          const float* tile = xt + m0 * Kp;
          for (int i0 = 0; i0 < GR; i0 += WIDE ? GNR : GNR2) {
            float* c = ag + i0 * Mp + m0;
            if constexpr (WIDE) {
              if (nm == 3) gemm_tile_blocks<GNR, 3>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
              else if (nm == 2) gemm_tile_blocks<GNR, 2>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
              else gemm_tile_blocks<GNR, 1>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
            } else {
              if (nm == 3) gemm_tile_blocks_avx2<3>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
              else if (nm == 2) gemm_tile_blocks_avx2<2>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
              else gemm_tile_blocks_avx2<1>(wg + i0, cg + b0, b1 - b0, tile, c, Mp);
            }
          }
        }
      }
    }
    for (int64_t g = 0; g < ng; g++) {
      float* ag = acc.data() + g * GR * Mp;
      if constexpr (WIDE) topk_adds_avx512(tkw.data() + g * C * k, tkx.data() + g * C * k, nt[g], xt, Kp, Mp, ag);
      else topk_adds_avx2(tkw.data() + g * C * k, tkx.data() + g * C * k, nt[g], xt, Kp, Mp, ag);
      const int64_t r0 = (g0 + g) * GR;
      for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < GR; i++) y[m * ldy + r0 + i] = ag[i * Mp + m];
    }
  }
}

// Weight rows chunk*16 .. chunk*16+15 for chunks [c0, c1) against every batch row, GG chunks at a time (so that
// a k-slice of x^T is read once per GG*16 weight rows): decode(chunk, buf) fills a chunk's buffer, row-major; xt
// holds x^T in tiles of 48 (the last maybe 16 or 32) batch rows.
template <bool WIDE, typename Decode>
void gemm_chunks(const float* xt, int64_t M, int64_t Mp, int64_t Kp, int64_t N, float* y, int64_t ldy,
                           int64_t c0, int64_t c1, Decode& decode) {
  const int64_t ld = gemm_ld(Kp);
  std::vector<float> buf(static_cast<size_t>(GG * GR * ld)), acc(static_cast<size_t>(GG * GR * Mp));
  for (int64_t g0 = c0; g0 < c1; g0 += GG) {
    const int64_t ng = std::min<int64_t>(GG, c1 - g0);
    for (int64_t g = 0; g < ng; g++) decode(g0 + g, buf.data() + g * GR * ld);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < Kp; k0 += GKC) {
      const int64_t kc = std::min<int64_t>(GKC, Kp - k0);
      for (int64_t g = 0; g < ng; g++) {
        const float* bg = buf.data() + g * GR * ld;
        float* ag = acc.data() + g * GR * Mp;
        for (int64_t m0 = 0; m0 < Mp; m0 += GNM * 16) {
          const int64_t nm = std::min<int64_t>(GNM, (Mp - m0) / 16);
          const float* tile = xt + m0 * Kp + k0 * nm * 16;
          for (int i0 = 0; i0 < GR; i0 += WIDE ? GNR : GNR2) {
            const float* w = bg + i0 * ld + k0;
            float* c = ag + i0 * Mp + m0;
            if constexpr (WIDE) {
              if (nm == 3) gemm_tile<GNR, 3>(w, ld, tile, kc, c, Mp);
              else if (nm == 2) gemm_tile<GNR, 2>(w, ld, tile, kc, c, Mp);
              else gemm_tile<GNR, 1>(w, ld, tile, kc, c, Mp);
            } else {
              if (nm == 3) gemm_tile_avx2<3>(w, ld, tile, kc, c, Mp);
              else if (nm == 2) gemm_tile_avx2<2>(w, ld, tile, kc, c, Mp);
              else gemm_tile_avx2<1>(w, ld, tile, kc, c, Mp);
            }
          }
        }
      }
    }
    for (int64_t g = 0; g < ng; g++) {
      const int64_t r0 = (g0 + g) * GR, rows = std::min<int64_t>(GR, N - r0);
      const float* ag = acc.data() + g * GR * Mp;
      for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < rows; i++) y[m * ldy + r0 + i] = ag[i * Mp + m];
    }
  }
}

// x [M, Kp] as x^T in tiles of 48 batch rows (the last maybe 16 or 32, zero-padded to Mp = M rounded up to 16):
// tile m0 holds xt[m0 * Kp + k * w + m] = x[m0 + m, k], w its width.
std::vector<float> pack_xt(const float* x, int64_t M, int64_t Kp, int64_t Mp) {
  std::vector<float> xt(static_cast<size_t>(Kp * Mp));
  at::parallel_for(0, Kp, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t m0 = 0; m0 < Mp; m0 += GNM * 16) {
      const int64_t w = std::min<int64_t>(GNM * 16, Mp - m0);
      float* tile = xt.data() + m0 * Kp;
      for (int64_t k = k0; k < k1; k++)
        for (int64_t m = 0; m < w; m++) tile[k * w + m] = m0 + m < M ? x[(m0 + m) * Kp + k] : 0.0f;
    }
  });
  return xt;
}

// y[M, N] (ldy columns) = x @ W.T for x [M, Kp], threads over chunks of 16 weight rows.
template <bool WIDE, typename Decode>
void packed_gemm(const float* x, int64_t M, int64_t Kp, int64_t N, float* y, int64_t ldy, Decode&& decode) {
  const int64_t Mp = (M + 15) / 16 * 16;
  const std::vector<float> xt = pack_xt(x, M, Kp, Mp);
  at::parallel_for(0, (N + GR - 1) / GR, 1, [&](int64_t c0, int64_t c1) {
    gemm_chunks<WIDE>(xt.data(), M, Mp, Kp, N, y, ldy, c0, c1, decode);
  });
}

bool cpu_has_avx512() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
                         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bitalg") &&
                         __builtin_cpu_supports("bmi2");
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

// ----------------------------------------------------------------------------- entry points

// impl: 0 = the fastest this CPU runs, 1 = portable, 2 = AVX2, 3 = AVX-512 (2 and 3 refused where the CPU lacks them)
enum Path { PORTABLE = 1, AVX2 = 2, AVX512 = 3 };
Path pick(int64_t impl) {
  TORCH_CHECK(impl >= 0 && impl <= 3, "impl must be 0 (auto), 1 (portable), 2 (avx2) or 3 (avx512)");
  TORCH_CHECK(impl != 2 || cpu_has_avx2(), "this CPU has no AVX2+FMA; use impl 0 or 1");
  TORCH_CHECK(impl != 3 || cpu_has_avx512(), "this CPU has no AVX-512 (F, BW, VL, VBMI2); use impl 0, 1 or 2");
  if (impl == 0) return cpu_has_avx512() ? AVX512 : cpu_has_avx2() ? AVX2 : PORTABLE;
  return static_cast<Path>(impl);
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D float32 CPU tensor");
}

// The sparse kernels take x as [..., K] (a decoder's [batch, tokens, K] as it comes) and give [..., N]: no reshape
// or view is left to Python for them, which costs ~2 us a call there.
torch::Tensor as_rows(const torch::Tensor& x) { return x.dim() == 2 ? x : x.reshape({-1, x.size(-1)}); }
torch::Tensor like_input(const torch::Tensor& xin, const torch::Tensor& y) {
  if (xin.dim() == 2) return y;
  auto sizes = xin.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// The packed values' type: fp32, bf16 (kept as uint16_t) or int8 (the kernels then compute sum(q * x), and the
// caller multiplies each output by its row's scale).
enum class VT { F32, BF16, I8 };
VT value_type(const torch::Tensor& v) {
  const auto t = v.scalar_type();
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kInt8,
              "packed values must be float32, bfloat16 or int8");
  TORCH_CHECK(v.is_contiguous(), "packed values must be contiguous");
  return t == torch::kInt8 ? VT::I8 : t == torch::kBFloat16 ? VT::BF16 : VT::F32;
}
template <typename T>
struct Tag {
  using type = T;
};
// f(Tag<W>{}) with W the C++ type of the values
template <typename F>
void by_type(VT t, F&& f) {
  if (t == VT::I8) f(Tag<int8_t>{});
  else if (t == VT::BF16) f(Tag<uint16_t>{});
  else f(Tag<float>{});
}

template <typename W>
const W* ptr(const torch::Tensor& v) {
  return reinterpret_cast<const W*>(v.data_ptr());
}

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// The argument checks shared by unstructured_mm and unstructured_gemm: x [B, Kp], a bitmask [N, Kp/8], rowptr.
void check_unstructured(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& rowptr) {
  check_x(x);
  TORCH_CHECK(x.size(1) % 8 == 0 && mask.size(1) == x.size(1) / 8, "x width must be the mask width x 8");
  TORCH_CHECK(rowptr.numel() == mask.size(0) + 1 && rowptr.scalar_type() == torch::kInt64,
              "rowptr must hold N+1 int64");
}

torch::Tensor unstructured_mm(torch::Tensor xin, torch::Tensor mask, torch::Tensor values, torch::Tensor rowptr,
                              int64_t impl) {
  const torch::Tensor x = as_rows(xin);
  check_unstructured(x, mask, rowptr);
  const int64_t B = x.size(0), Kp = x.size(1), N = mask.size(0);
  const VT vt = value_type(values);
  const Path path = pick(impl);
  auto y = torch::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t nv = values.numel();
  at::parallel_for(0, N, grain(Kp * B), [&](int64_t n0, int64_t n1) {
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
#ifdef HP_X86
      if (path == AVX512) return unstructured_fast<true>(xp, B, Kp, mp, ptr<W>(values), nv, rp, n0, n1, N, yp);
      if (path == AVX2) return unstructured_fast<false>(xp, B, Kp, mp, ptr<W>(values), nv, rp, n0, n1, N, yp);
#endif
      unstructured_portable(xp, B, Kp, mp, ptr<W>(values), rp, n0, n1, N, yp);
    });
  });
  return like_input(xin, y);
}

// The argument checks shared by nm24_mm and nm24_gemm: x [B, K], values [N, K/2], positions [N, K/8].
void check_nm24(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& positions) {
  check_x(x);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 16 == 0, "2:4 kernels need the input width to be a multiple of 16");
  TORCH_CHECK(values.dim() == 2 && values.size(1) == K / 2, "2:4 values must be [N, K/2]");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == values.size(0) && positions.size(1) == K / 8,
              "2:4 positions must be [N, K/8] bytes");
}

torch::Tensor nm24_mm(torch::Tensor xin, torch::Tensor values, torch::Tensor positions, int64_t impl) {
  const torch::Tensor x = as_rows(xin);
  check_nm24(x, values, positions);
  const int64_t B = x.size(0), K = x.size(1), N = values.size(0);
  const VT vt = value_type(values);
  const Path path = pick(impl);
  auto y = torch::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = positions.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K * B), [&](int64_t n0, int64_t n1) {
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
#ifdef HP_X86
      if (path == AVX512) return nm24_fast<true>(xp, B, K, ptr<W>(values), pp, n0, n1, N, yp);
      if (path == AVX2) return nm24_fast<false>(xp, B, K, ptr<W>(values), pp, n0, n1, N, yp);
#endif
      nm24_portable(xp, B, K, ptr<W>(values), pp, n0, n1, N, yp);
    });
  });
  return like_input(xin, y);
}

// The argument checks shared by tiered_mm and tiered_gemm: x [B, C*16], a tier map [R, C] and its blocks.
struct TieredArgs {
  int64_t R, C, k;
  VT vt;
};
TieredArgs check_tiered(const torch::Tensor& x, const torch::Tensor& tiers, const torch::Tensor& dense,
                        const torch::Tensor& nm_values, const torch::Tensor& nm_positions,
                        const torch::Tensor& topk_values, const torch::Tensor& topk_positions,
                        const torch::Tensor& offsets) {
  check_x(x);
  TORCH_CHECK(tiers.dim() == 2 && tiers.scalar_type() == torch::kInt8, "tier map must be 2-D int8");
  const int64_t R = tiers.size(0), C = tiers.size(1);
  TORCH_CHECK(x.size(1) == C * 16, "x width must be the tier map width x 16");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() && offsets.numel() == (R + 1) * 3,
              "offsets must be [R+1, 3]");
  TORCH_CHECK(nm_positions.scalar_type() == torch::kInt32, "2:4 block positions must be int32 words");
  TORCH_CHECK(topk_positions.scalar_type() == torch::kUInt8, "top-k positions must be uint8");
  const VT vt = value_type(dense);
  TORCH_CHECK(value_type(nm_values) == vt && value_type(topk_values) == vt, "all packed values must share one dtype");
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(op[R * 3] == dense.numel() / 256 && op[R * 3 + 1] == nm_values.numel() / 128 &&
              op[R * 3 + 2] == topk_positions.size(0), "offsets disagree with the blocks");
  return {R, C, topk_positions.dim() == 2 ? topk_positions.size(1) : 0, vt};
}

torch::Tensor tiered_mm(torch::Tensor xin, torch::Tensor tiers, torch::Tensor dense, torch::Tensor nm_values,
                        torch::Tensor nm_positions, torch::Tensor topk_values, torch::Tensor topk_positions,
                        torch::Tensor offsets, int64_t impl) {
  const torch::Tensor x = as_rows(xin);
  const TieredArgs a = check_tiered(x, tiers, dense, nm_values, nm_positions, topk_values, topk_positions, offsets);
  const int64_t B = x.size(0), R = a.R, C = a.C, k = a.k;
  const Path path = pick(impl);
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t Np = R * 16;
  auto y = torch::empty({B, Np}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* tp = tiers.data_ptr<int8_t>();
  const uint32_t* np_ = reinterpret_cast<const uint32_t*>(nm_positions.data_ptr<int32_t>());
  const uint8_t* kp = topk_positions.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // grain counts a block row's 16 x C*16 weights: the default model's k_proj (12 block rows) then runs on both
  // threads (with a quarter of that it ran on one, 1.8x slower from DRAM)
  at::parallel_for(0, R, grain(C * 256 * B), [&](int64_t r0, int64_t r1) {
    by_type(a.vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
#define HP_TIERED(IMPL) \
  IMPL(xp, B, C, tp, ptr<W>(dense), ptr<W>(nm_values), np_, ptr<W>(topk_values), kp, k, op, r0, r1, Np, yp)
#ifdef HP_X86
      if (path == AVX512) return HP_TIERED(tiered_fast<true>);
      if (path == AVX2) return HP_TIERED(tiered_fast<false>);
#endif
      HP_TIERED(tiered_portable);
#undef HP_TIERED
    });
  });
  return like_input(xin, y);
}

// The dense-strips route (large batches, where torch's matmul of the decoded rows can beat the packed GEMM): a
// range of rows decoded into `out`, a contiguous fp32 buffer that the caller reuses from strip to strip (a fresh
// 8 MB tensor a strip cost more in page faults than the decoding), with the vectors of path `impl` (decoding is
// exact, so every path gives the same floats).
void check_out(const torch::Tensor& out, int64_t rows, int64_t cols) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == cols && out.scalar_type() == torch::kFloat32 &&
                  out.is_contiguous() && out.device().is_cpu(),
              "out must be a contiguous float32 CPU tensor of shape [", rows, ", ", cols, "]");
}

// Rows [r0, r1) of a bitmask-packed matrix into out [r1 - r0, Kp], row-major.
torch::Tensor unstructured_decode(torch::Tensor mask, torch::Tensor values, torch::Tensor rowptr, int64_t r0,
                                  int64_t r1, torch::Tensor out, int64_t impl) {
  const int64_t Kp = mask.size(1) * 8;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= mask.size(0), "row range out of bounds");
  check_out(out, r1 - r0, Kp);
  const Path path = pick(impl);
  const VT vt = value_type(values);
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t nv = values.numel();
  at::parallel_for(r0, r1, grain(Kp), [&](int64_t a, int64_t b) {
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
#ifdef HP_X86
      if (path == AVX512) {
        for (int64_t r = a; r < b; r++) unstructured_row_dec_avx512(mp + r * (Kp / 8), ptr<W>(values) + rp[r], Kp / 8, o + (r - r0) * Kp);
        return;
      }
      if (path == AVX2) return unstructured_rows_avx2(mp, ptr<W>(values), nv, rp, Kp, a, b, o + (a - r0) * Kp);
#endif
      unstructured_rows(mp, ptr<W>(values), rp, Kp, a, b, o + (a - r0) * Kp);
    });
  });
  return out;
}

// Rows [r0, r1) of a 2:4-packed matrix into out [r1 - r0, K], row-major.
torch::Tensor nm24_decode(torch::Tensor values, torch::Tensor positions, int64_t r0, int64_t r1, torch::Tensor out,
                          int64_t impl) {
  const int64_t nv = values.size(1), K = nv * 2;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= values.size(0), "row range out of bounds");
  check_out(out, r1 - r0, K);
  const Path path = pick(impl);
  const VT vt = value_type(values);
  const uint8_t* pp = positions.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(r0, r1, grain(K), [&](int64_t a, int64_t b) {
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
      const W* v = ptr<W>(values);
#ifdef HP_X86
      if (path != PORTABLE) {
        const auto row = path == AVX512 ? nm24_row_dec_avx512<W> : nm24_row_dec_avx2<W>;
        for (int64_t r = a; r < b; r++) row(v + r * nv, pp + r * (nv / 4), nv, o + (r - r0) * K);
        return;
      }
#endif
      nm24_rows(v, pp, K, a, b, o + (a - r0) * K);
    });
  });
  return out;
}

// Block rows [R0, R1) of a tiered matrix, transposed, into out [C * 16, (R1 - R0) * 16]: W's rows R0 * 16 ..
// R1 * 16 as columns, so that each block's columns are stored whole (x @ W.T is then x @ out).
torch::Tensor tiered_decode_t(torch::Tensor tiers, torch::Tensor dense, torch::Tensor nm_values,
                              torch::Tensor nm_positions, torch::Tensor topk_values, torch::Tensor topk_positions,
                              torch::Tensor offsets, int64_t R0, int64_t R1, torch::Tensor out, int64_t impl) {
  const int64_t R = tiers.size(0), C = tiers.size(1), Kp = C * 16, ld = (R1 - R0) * 16;
  TORCH_CHECK(0 <= R0 && R0 <= R1 && R1 <= R, "block row range out of bounds");
  check_out(out, Kp, ld);
  const Path path = pick(impl);
  const VT vt = value_type(dense);
  const int64_t k = topk_positions.dim() == 2 ? topk_positions.size(1) : 0;
  const int8_t* tp = tiers.data_ptr<int8_t>();
  const uint32_t* np_ = reinterpret_cast<const uint32_t*>(nm_positions.data_ptr<int32_t>());
  const uint8_t* kp = topk_positions.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(R0, R1, 1, [&](int64_t a, int64_t b) {
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
      auto dense_block = dense_block_portable<W>;
      auto nm_block = nm_block_portable<W>;
#ifdef HP_X86
      if (path == AVX512) dense_block = dense_block_avx512<W>, nm_block = nm_block_avx512<W>;
      if (path == AVX2) dense_block = dense_block_avx2<W>, nm_block = nm_block_avx2<W>;
#endif
      tiered_cols(C, tp, ptr<W>(dense), ptr<W>(nm_values), np_, ptr<W>(topk_values), kp, k, op, a, b, R0, o, ld,
                  dense_block, nm_block);
    });
  });
  return out;
}

// The large-batch GEMM: AVX-512 (impl 0 or 3) or AVX2 (impl 2, or 0 on a CPU without AVX-512), bit for bit the
// same; a CPU with neither decodes strips for torch's matmul instead (PackedLinear's dense-strips route).
bool gemm_wide(int64_t impl) {
  const Path path = pick(impl);
  TORCH_CHECK(path != PORTABLE, "the packed GEMM needs AVX2+FMA or AVX-512; use the sparse kernel or dense strips");
  return path == AVX512;
}

torch::Tensor unstructured_gemm(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor rowptr,
                                int64_t impl) {
  const bool wide = gemm_wide(impl);
  check_unstructured(x, mask, rowptr);
  const int64_t B = x.size(0), Kp = x.size(1), N = mask.size(0);
  auto y = torch::empty({B, N}, x.options());
#ifdef HP_X86
  const VT vt = value_type(values);
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t nv = values.numel();
  auto decode = [&](int64_t ch, float* buf) {
    const int64_t rows = std::min<int64_t>(GR, N - ch * GR);
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
      if (wide) unstructured_rows_avx512(mp, ptr<W>(values), rp, Kp, ch * GR, rows, buf);
      else unstructured_buf_avx2(mp, ptr<W>(values), nv, rp, Kp, ch * GR, rows, buf);
    });
  };
  if (wide) packed_gemm<true>(x.data_ptr<float>(), B, Kp, N, y.data_ptr<float>(), N, decode);
  else packed_gemm<false>(x.data_ptr<float>(), B, Kp, N, y.data_ptr<float>(), N, decode);
#endif
  return y;
}

torch::Tensor nm24_gemm(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t impl) {
  const bool wide = gemm_wide(impl);
  check_nm24(x, values, positions);
  const int64_t B = x.size(0), K = x.size(1), N = values.size(0);
  auto y = torch::empty({B, N}, x.options());
#ifdef HP_X86
  const VT vt = value_type(values);
  const uint8_t* pp = positions.data_ptr<uint8_t>();
  auto decode = [&](int64_t ch, float* buf) {
    const int64_t rows = std::min<int64_t>(GR, N - ch * GR);
    by_type(vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
      if (wide) nm24_rows_avx512(ptr<W>(values), pp, K, ch * GR, rows, buf);
      else nm24_buf_avx2(ptr<W>(values), pp, K, ch * GR, rows, buf);
    });
  };
  if (wide) packed_gemm<true>(x.data_ptr<float>(), B, K, N, y.data_ptr<float>(), N, decode);
  else packed_gemm<false>(x.data_ptr<float>(), B, K, N, y.data_ptr<float>(), N, decode);
#endif
  return y;
}

torch::Tensor tiered_gemm(torch::Tensor x, torch::Tensor tiers, torch::Tensor dense, torch::Tensor nm_values,
                          torch::Tensor nm_positions, torch::Tensor topk_values, torch::Tensor topk_positions,
                          torch::Tensor offsets, int64_t impl) {
  const bool wide = gemm_wide(impl);
  const TieredArgs a = check_tiered(x, tiers, dense, nm_values, nm_positions, topk_values, topk_positions, offsets);
  auto y = torch::empty({x.size(0), a.R * 16}, x.options());
#ifdef HP_X86
  const int64_t B = x.size(0), R = a.R, C = a.C, k = a.k;
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int8_t* tp = tiers.data_ptr<int8_t>();
  const uint32_t* np_ = reinterpret_cast<const uint32_t*>(nm_positions.data_ptr<int32_t>());
  const uint8_t* kp = topk_positions.data_ptr<uint8_t>();
  const int64_t Mp = (B + 15) / 16 * 16;
  const std::vector<float> xt = pack_xt(x.data_ptr<float>(), B, C * 16, Mp);
  float* yp = y.data_ptr<float>();
  auto panel = [&](int64_t Rb, float* buf, int32_t* cols, int64_t& nb, float* tkw, int32_t* tkx, int64_t& nt) {
    const int64_t d = op[Rb * 3], n = op[Rb * 3 + 1], t = op[Rb * 3 + 2];
    by_type(a.vt, [&](auto tag) {
      using W = typename decltype(tag)::type;
      tiered_panel(C, tp + Rb * C, ptr<W>(dense), ptr<W>(nm_values), np_, ptr<W>(topk_values), kp, k, d, n, t, buf, cols,
                   nb, tkw, tkx, nt, wide ? dense_block_avx512<W> : dense_block_avx2<W>,
                   wide ? nm_block_avx512<W> : nm_block_avx2<W>);
    });
  };
  at::parallel_for(0, R, 1, [&](int64_t R0, int64_t R1) {
    if (wide) tiered_gemm_rows<true>(xt.data(), B, Mp, C, k, yp, R * 16, R0, R1, panel);
    else tiered_gemm_rows<false>(xt.data(), B, Mp, C, k, yp, R * 16, R0, R1, panel);
  });
#endif
  return y;
}

// ----------------------------------------------------------------------------- int8 activations (int8 values)
//
// With int8 values, x may also be rounded to int8 (PackedLinear.activations == "int8"): each batch row b gets one
// scale s_b = max|x_b| / 127 and q = nearbyint(x * 127 / max|x_b|) in [-127, 127]. The kernels then sum q * w in
// int32, exactly, so every path gives the same integer whatever its order, and y[b, n] = float(sum) * s_b (the
// caller multiplies by the row's weight scale, as for fp32 activations). |sum| <= K * 127 * 127 and the VNNI
// form's (q + 128) * w sums <= K * 255 * 127 fit in int32 for K < 66,000.
//   portable  the signed products, one at a time.
//   VNNI      AVX-512 VNNI's vpdpbusd: 64 byte products a step, unsigned x times signed w, so x is offset to
//             u = q + 128 and 128 * rowsum(w) taken off at the end (rowsum: the row's int8 values summed, a buffer
//             PackedLinear keeps). Unstructured: the next popcount(m) values spread over 64 columns by vpexpandb;
//             2:4: 64 values (128 columns) a step, their inputs gathered by vpermi2b with indices built from the
//             2-bit positions by vpmultishiftqb; tiered: see tiered_q8_row.
// Measured (bench/int8.py, 11008 x 4096, batch 1, AMD EPYC Zen 4, 2 threads, weights from DRAM, 2026-12-07): the
// unstructured int8 kernel 3.8 ms with fp32 x and 1.7 ms with int8 x, against quantize_dynamic's 1.9 ms; in cache,
// vpexpandb is about 40% of the unstructured step (it is a slow instruction on Zen 4).

// x [B, K] -> q [B, Kx] (int8, zero past K) and s [B]; flip = 0x80 stores q + 128 as unsigned bytes (VNNI)
void quantize_rows(const float* x, int64_t B, int64_t K, int64_t Kx, int8_t* q, float* s, uint8_t flip) {
  for (int64_t b = 0; b < B; b++) {
    const float* xb = x + b * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(xb[k]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    s[b] = amax / 127.0f;
    int8_t* qb = q + b * Kx;
    for (int64_t k = 0; k < K; k++)
      qb[k] = static_cast<int8_t>(static_cast<uint8_t>(
          static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(xb[k] * inv))))) ^ flip);
    for (int64_t k = K; k < Kx; k++) qb[k] = static_cast<int8_t>(flip);
  }
}

void unstructured_q8_portable(const int8_t* q, int64_t B, int64_t Kx, int64_t Kp, const uint8_t* mask,
                              const int8_t* vals, const int64_t* rowptr, int64_t n0, int64_t n1, int32_t* out,
                              int64_t N) {
  const int64_t mb = Kp / 8;
  for (int64_t r = n0; r < n1; r++)
    for (int64_t b = 0; b < B; b++) {
      const int8_t* v = vals + rowptr[r];
      int32_t acc = 0;
      for (int64_t k = 0; k < Kp; k++)
        if ((mask[r * mb + k / 8] >> (k % 8)) & 1) acc += static_cast<int32_t>(*v++) * q[b * Kx + k];
      out[b * N + r] = acc;
    }
}

void nm24_q8_portable(const int8_t* q, int64_t B, int64_t Kx, int64_t K, const int8_t* vals, const uint8_t* pos,
                      int64_t n0, int64_t n1, int32_t* out, int64_t N) {
  const int64_t nv = K / 2;
  for (int64_t r = n0; r < n1; r++)
    for (int64_t b = 0; b < B; b++) {
      int32_t acc = 0;
      for (int64_t j = 0; j < nv; j++) {
        const int p = (pos[r * (nv / 4) + j / 4] >> (2 * (j % 4))) & 3;
        acc += static_cast<int32_t>(vals[r * nv + j]) * q[b * Kx + (j / 2) * 4 + p];
      }
      out[b * N + r] = acc;
    }
}

// Tiered, one block row at a time: int32 sums per row (dense and 2:4 blocks in acc, top-k blocks in top, as the
// float kernels keep them).
void tiered_q8_portable(const int8_t* q, int64_t B, int64_t Kx, int64_t C, const int8_t* tiers, const int8_t* dense,
                        const int8_t* nmv, const uint32_t* nmp, const int8_t* tkv, const uint8_t* tkp, int64_t k,
                        const int64_t* off, int64_t r0, int64_t r1, int64_t Np, int32_t* out) {
  for (int64_t R = r0; R < r1; R++)
    for (int64_t b = 0; b < B; b++) {
      int32_t acc[16] = {0};
      int64_t d = off[R * 3], n = off[R * 3 + 1], t = off[R * 3 + 2];
      for (int64_t c = 0; c < C; c++) {
        const int8_t* xc = q + b * Kx + c * 16;
        const int tier = tiers[R * C + c];
        if (tier == 0) {
          const int8_t* w = dense + d++ * 256;
          for (int j = 0; j < 16; j++)
            for (int i = 0; i < 16; i++) acc[i] += static_cast<int32_t>(w[j * 16 + i]) * xc[j];
        } else if (tier == 1) {
          const int8_t* w = nmv + n * 128;
          const uint32_t* p = nmp + n * 8;
          n++;
          for (int s = 0; s < 8; s++)
            for (int i = 0; i < 16; i++)
              acc[i] += static_cast<int32_t>(w[s * 16 + i]) * xc[(s / 2) * 4 + ((p[s] >> (2 * i)) & 3)];
        } else if (tier == 2) {
          const int8_t* w = tkv + t * k;
          const uint8_t* p = tkp + t * k;
          t++;
          for (int64_t e = 0; e < k; e++) acc[p[e] >> 4] += static_cast<int32_t>(w[e]) * xc[p[e] & 15];
        }
      }
      for (int i = 0; i < 16; i++) out[b * Np + R * 16 + i] = acc[i];
    }
}

#ifdef HP_X86
#define HP_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,avx2,fma,popcnt,bmi2")))
bool cpu_has_vnni() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") &&
                         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("bmi2");
  return ok;
}

// NR rows x NB batch rows; u [NB][Kx] (q + 128, Kx a multiple of 64); sums into out[i * N + r + q]
template <int NR, int NB>
HP_VNNI void unstructured_q8_rows(const uint8_t* u, int64_t Kx, int64_t mb, const uint8_t* mask, const int8_t* vals,
                                  const int64_t* rowptr, const int32_t* rowsum, int64_t r, int32_t* out, int64_t N) {
  __m512i acc[NR][NB];
  const int8_t* v[NR];
  for (int q = 0; q < NR; q++) {
    v[q] = vals + rowptr[r + q];
    for (int i = 0; i < NB; i++) acc[q][i] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < mb; c += 8) {  // 64 columns a step; a short last step reads only its mask bytes
    __m512i xv[NB];
    for (int i = 0; i < NB; i++) xv[i] = _mm512_loadu_si512(u + i * Kx + c * 8);
    for (int q = 0; q < NR; q++) {
      uint64_t m = 0;
      if (c + 8 <= mb) std::memcpy(&m, mask + (r + q) * mb + c, 8);
      else std::memcpy(&m, mask + (r + q) * mb + c, static_cast<size_t>(mb - c));
      if (q == NR - 1) HP_PREFETCH(v[q]);
      const int pc = static_cast<int>(_mm_popcnt_u64(m));
      const __m512i w = _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, pc), v[q]));
      v[q] += pc;
      for (int i = 0; i < NB; i++) acc[q][i] = _mm512_dpbusd_epi32(acc[q][i], xv[i], w);
    }
  }
  for (int q = 0; q < NR; q++)
    for (int i = 0; i < NB; i++) out[i * N + r + q] = _mm512_reduce_add_epi32(acc[q][i]) - 128 * rowsum[r + q];
}

struct Q8Tables {  // built once: per block row they cost as much as a small matrix's blocks
  alignas(64) uint8_t trans[64], gath[64], ctl[64], nm_base[64];
  Q8Tables() {
    for (int j = 0; j < 64; j++) nm_base[j] = static_cast<uint8_t>(4 * (j / 2));  // 2:4 value j's group start
    for (int i = 0; i < 16; i++)
      for (int c = 0; c < 4; c++) trans[i * 4 + c] = static_cast<uint8_t>(c * 16 + i);
    for (int q = 0; q < 8; q++)
      for (int l = 0; l < 2; l++)
        for (int c = 0; c < 4; c++) {
          gath[q * 8 + l * 4 + c] = static_cast<uint8_t>(c * 4 + q / 2);  // byte q/2 of word c (rows 4(q/2)..)
          ctl[q * 8 + l * 4 + c] = static_cast<uint8_t>(c * 8 + (q % 2) * 4 + l * 2);  // row 2q+l's 2 bits in it
        }
  }
};
const Q8Tables kQ8;

// One row against NB batch rows: 64 values (32 groups, 128 columns) a step.
template <int NB>
HP_VNNI void nm24_q8_row(const uint8_t* u, int64_t Kx, int64_t K, const int8_t* vr, const uint8_t* pr,
                         int32_t rowsum, int32_t* out, int64_t N) {
  const int64_t nv = K / 2;
  // byte j of qword t takes bits 2j.. of the qword: value 8t+j's position, from pos bytes 2t and 2t+1
  const __m512i ctl = _mm512_set1_epi64(0x0E0C0A0806040200LL);
  const __m512i base = _mm512_load_si512(kQ8.nm_base), three = _mm512_set1_epi8(3);
  __m512i acc[NB];
  for (int i = 0; i < NB; i++) acc[i] = _mm512_setzero_si512();
  for (int64_t j = 0; j < nv; j += 64) {
    const int64_t left = std::min<int64_t>(64, nv - j);  // a multiple of 8 (K % 16 == 0)
    const __m512i w = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, static_cast<unsigned>(left)), vr + j);
    HP_PREFETCH(vr + j);
    const __m128i pb = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (left / 4)) - 1), pr + j / 4);
    const __m512i idx = _mm512_add_epi8(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctl, _mm512_cvtepu16_epi64(pb)),
                                                         three), base);
    for (int i = 0; i < NB; i++) {
      const uint8_t* xw = u + i * Kx + 2 * j;  // the step's 128 columns (Kx holds K rounded up to 128)
      const __m512i xg = _mm512_permutex2var_epi8(_mm512_loadu_si512(xw), idx, _mm512_loadu_si512(xw + 64));
      acc[i] = _mm512_dpbusd_epi32(acc[i], xg, w);
    }
  }
  for (int i = 0; i < NB; i++) out[i * N] = _mm512_reduce_add_epi32(acc[i]) - 128 * rowsum;
}
// One 16-row block row against NB batch rows, lane i = the block's row i. A block's 4 columns x 16 rows (64 bytes,
// column-major) are moved to row-major groups of 4 by one vpermb, so that vpdpbusd adds each row's 4 products:
// dense blocks against 4 broadcast x bytes; 2:4 blocks (value columns 4h..4h+3) against x bytes gathered from the
// block's 16 by indices built from the 2-bit positions (vpermb: byte (q/2) of each position word to qword q, then
// vpmultishiftqb takes each row's 2 bits). Top-k values add one at a time, on the same offset x.
template <int NB>
HP_VNNI void tiered_q8_row(const uint8_t* u, int64_t Kx, int64_t C, const int8_t* tr, const int8_t* dense,
                           const int8_t* nmv, const uint32_t* nmp, const int8_t* tkv, const uint8_t* tkp, int64_t k,
                           int64_t d, int64_t n, int64_t t, const int32_t* rowsum, int32_t* out, int64_t Np) {
  const __m512i trans = _mm512_load_si512(kQ8.trans), gath = _mm512_load_si512(kQ8.gath),
                ctl = _mm512_load_si512(kQ8.ctl), three = _mm512_set1_epi8(3);
  const __m512i half_base[2] = {_mm512_set1_epi32(0x04040000), _mm512_set1_epi32(0x0C0C0808)};
  __m512i acc[NB];
  int32_t top[NB][16];
  for (int i = 0; i < NB; i++) {
    acc[i] = _mm512_setzero_si512();
    for (int j = 0; j < 16; j++) top[i][j] = 0;
  }
  for (int64_t c = 0; c < C; c++) {
    const int tier = tr[c];
    const uint8_t* xc = u + c * 16;
    if (tier == 0) {
      const int8_t* w = dense + d++ * 256;
      HP_PREFETCH(w);
      HP_PREFETCH(w + 128);
      for (int s = 0; s < 4; s++) {
        const __m512i ws = _mm512_permutexvar_epi8(trans, _mm512_loadu_si512(w + s * 64));
        for (int i = 0; i < NB; i++) {
          int32_t x4;
          std::memcpy(&x4, xc + i * Kx + s * 4, 4);
          acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(x4), ws);
        }
      }
    } else if (tier == 1) {
      const int8_t* w = nmv + n * 128;
      const uint32_t* p = nmp + n * 8;
      n++;
      HP_PREFETCH(w);
      HP_PREFETCH(p);
      for (int h = 0; h < 2; h++) {
        const __m512i ws = _mm512_permutexvar_epi8(trans, _mm512_loadu_si512(w + h * 64));
        const __m512i words = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + h * 4)));
        const __m512i bits = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(gath, words));
        const __m512i idx = _mm512_add_epi8(_mm512_and_si512(bits, three), half_base[h]);
        for (int i = 0; i < NB; i++) {
          const __m512i x16 = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xc + i * Kx)));
          acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_permutexvar_epi8(idx, x16), ws);
        }
      }
    } else if (tier == 2) {
      const int8_t* w = tkv + t * k;
      const uint8_t* p = tkp + t * k;
      t++;
      for (int64_t e = 0; e < k; e++)
        for (int i = 0; i < NB; i++) top[i][p[e] >> 4] += static_cast<int32_t>(w[e]) * xc[i * Kx + (p[e] & 15)];
    }
  }
  for (int i = 0; i < NB; i++) {
    alignas(64) int32_t a[16];
    _mm512_store_si512(a, acc[i]);
    for (int j = 0; j < 16; j++) out[i * Np + j] = a[j] + top[i][j] - 128 * rowsum[j];
  }
}
#else
bool cpu_has_vnni() { return false; }
#endif

// impl 3 (or 0 on a CPU that has it) runs VNNI; 1 and 2 the portable sums (no AVX2 form: same integers).
bool use_vnni(int64_t impl) {
  TORCH_CHECK(impl >= 0 && impl <= 3, "impl must be 0 (auto), 1 (portable), 2 (avx2) or 3 (avx512)");
  TORCH_CHECK(impl != 3 || cpu_has_vnni(), "this CPU has no AVX-512 VNNI (with VBMI, VBMI2); use impl 0 or 1");
  return (impl == 3 || impl == 0) && cpu_has_vnni();
}

// What every int8-activation entry point checks besides its layout: int8 values, N row sums, a width the int32
// sums hold.
void check_q8(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& rowsum, int64_t n) {
  TORCH_CHECK(values.scalar_type() == torch::kInt8 && values.is_contiguous(), "int8 activations need int8 values");
  TORCH_CHECK(rowsum.scalar_type() == torch::kInt32 && rowsum.numel() == n, "rowsum must hold one int32 per row");
  TORCH_CHECK(x.size(1) < 66000, "int8 activations: the input width must be below 66,000 (int32 sums)");
}

struct Q8 {
  torch::Tensor q, s;
  int64_t Kx, rows;  // rows = B * levels: the kernels' batch rows
};
// x's rows rounded to int8 in a buffer `align` columns wide (zero past K); with VNNI, offset to q + 128.
// levels = 2 (activations "int8x2") appends B more rows: each row's rounding error r = x - s * q, itself rounded
// to int8 with a scale of its own (|r| <= s / 2, so x is carried to about 1/64,000 of max |x|). The kernels then
// take 2B rows of int8, reading each weight once for both, and the sums stay exact in int32.
Q8 quantized(const torch::Tensor& x, int64_t align, bool vnni, int64_t levels) {
  TORCH_CHECK(levels == 1 || levels == 2, "levels must be 1 (int8) or 2 (int8x2)");
  const int64_t B = x.size(0), K = x.size(1), Kx = (K + align - 1) / align * align;
  const uint8_t flip = vnni ? 0x80 : 0;
  Q8 r{torch::empty({B * levels, Kx}, x.options().dtype(torch::kInt8)), torch::empty({B * levels}, x.options()), Kx,
       B * levels};
  int8_t* q = r.q.data_ptr<int8_t>();
  float* s = r.s.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  quantize_rows(xp, B, K, Kx, q, s, flip);
  if (levels == 2) {
    std::vector<float> err(static_cast<size_t>(B * K));
    for (int64_t b = 0; b < B; b++)
      for (int64_t k = 0; k < K; k++) {
        const int8_t qk = static_cast<int8_t>(static_cast<uint8_t>(q[b * Kx + k]) ^ flip);
        err[b * K + k] = xp[b * K + k] - s[b] * static_cast<float>(qk);
      }
    quantize_rows(err.data(), B, K, Kx, q + B * Kx, s + B, flip);
  }
  return r;
}

// y[b, n] = float(sums[b, n]) * s[b] (plus float(sums[B + b, n]) * s[B + b] with two levels), in one pass (two
// torch ops here cost ~10 us a call, a small matrix's whole kernel)
torch::Tensor scaled_by_rows(const torch::Tensor& sums, const torch::Tensor& s, int64_t levels) {
  const int64_t B = sums.size(0) / levels, N = sums.size(1);
  auto y = torch::empty({B, N}, sums.options().dtype(torch::kFloat32));
  const int32_t* in = sums.data_ptr<int32_t>();
  const float* sp = s.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t b = 0; b < B; b++)
    for (int64_t n = 0; n < N; n++) {
      float v = static_cast<float>(in[b * N + n]) * sp[b];
      if (levels == 2) v += static_cast<float>(in[(B + b) * N + n]) * sp[B + b];
      out[b * N + n] = v;
    }
  return y;
}

torch::Tensor unstructured_mm_q8(torch::Tensor xin, torch::Tensor mask, torch::Tensor values, torch::Tensor rowptr,
                                 torch::Tensor rowsum, int64_t impl, int64_t levels) {
  const torch::Tensor x = as_rows(xin);
  check_unstructured(x, mask, rowptr);
  check_q8(x, values, rowsum, mask.size(0));
  const bool vnni = use_vnni(impl);
  const Q8 xq = quantized(x, 64, vnni, levels);
  const int64_t B = xq.rows, Kp = x.size(1), N = mask.size(0), mb = Kp / 8;
  auto sums = torch::empty({B, N}, x.options().dtype(torch::kInt32));
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int8_t* vp = values.data_ptr<int8_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  int32_t* op = sums.data_ptr<int32_t>();
  at::parallel_for(0, N, grain(Kp * B), [&](int64_t n0, int64_t n1) {
#ifdef HP_X86
    if (vnni) {
      const uint8_t* u = reinterpret_cast<const uint8_t*>(xq.q.data_ptr<int8_t>());
      const int32_t* rs = rowsum.data_ptr<int32_t>();
      for (int64_t b0 = 0; b0 < B; b0 += BC) {
        const int64_t nb = std::min<int64_t>(BC, B - b0);
        const uint8_t* ub = u + b0 * xq.Kx;
        int32_t* ob = op + b0 * N;
        int64_t r = n0;
        switch (nb) {
          case 1:
            for (; r + 4 <= n1; r += 4) unstructured_q8_rows<4, 1>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N);
            for (; r < n1; r++) unstructured_q8_rows<1, 1>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N);
            break;
          case 2:
            for (; r + 4 <= n1; r += 4) unstructured_q8_rows<4, 2>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N);
            for (; r < n1; r++) unstructured_q8_rows<1, 2>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N);
            break;
          case 3: for (; r < n1; r++) unstructured_q8_rows<1, 3>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N); break;
          default: for (; r < n1; r++) unstructured_q8_rows<1, 4>(ub, xq.Kx, mb, mp, vp, rp, rs, r, ob, N);
        }
      }
      return;
    }
#endif
    unstructured_q8_portable(xq.q.data_ptr<int8_t>(), B, xq.Kx, Kp, mp, vp, rp, n0, n1, op, N);
  });
  return like_input(xin, scaled_by_rows(sums, xq.s, levels));
}

torch::Tensor nm24_mm_q8(torch::Tensor xin, torch::Tensor values, torch::Tensor positions, torch::Tensor rowsum,
                         int64_t impl, int64_t levels) {
  const torch::Tensor x = as_rows(xin);
  check_nm24(x, values, positions);
  check_q8(x, values, rowsum, values.size(0));
  const bool vnni = use_vnni(impl);
  const Q8 xq = quantized(x, 128, vnni, levels);
  const int64_t B = xq.rows, K = x.size(1), N = values.size(0);
  auto sums = torch::empty({B, N}, x.options().dtype(torch::kInt32));
  const int8_t* vp = values.data_ptr<int8_t>();
  const uint8_t* pp = positions.data_ptr<uint8_t>();
  int32_t* op = sums.data_ptr<int32_t>();
  at::parallel_for(0, N, grain(K * B), [&](int64_t n0, int64_t n1) {
#ifdef HP_X86
    if (vnni) {
      const uint8_t* u = reinterpret_cast<const uint8_t*>(xq.q.data_ptr<int8_t>());
      const int32_t* rs = rowsum.data_ptr<int32_t>();
      const int64_t nv = K / 2;
      for (int64_t b0 = 0; b0 < B; b0 += BC) {
        const int64_t nb = std::min<int64_t>(BC, B - b0);
        const uint8_t* ub = u + b0 * xq.Kx;
        for (int64_t r = n0; r < n1; r++) {
          int32_t* o = op + b0 * N + r;
          const int8_t* vr = vp + r * nv;
          const uint8_t* pr = pp + r * (nv / 4);
          switch (nb) {
            case 1: nm24_q8_row<1>(ub, xq.Kx, K, vr, pr, rs[r], o, N); break;
            case 2: nm24_q8_row<2>(ub, xq.Kx, K, vr, pr, rs[r], o, N); break;
            case 3: nm24_q8_row<3>(ub, xq.Kx, K, vr, pr, rs[r], o, N); break;
            default: nm24_q8_row<4>(ub, xq.Kx, K, vr, pr, rs[r], o, N);
          }
        }
      }
      return;
    }
#endif
    nm24_q8_portable(xq.q.data_ptr<int8_t>(), B, xq.Kx, K, vp, pp, n0, n1, op, N);
  });
  return like_input(xin, scaled_by_rows(sums, xq.s, levels));
}

torch::Tensor tiered_mm_q8(torch::Tensor xin, torch::Tensor tiers, torch::Tensor dense, torch::Tensor nm_values,
                           torch::Tensor nm_positions, torch::Tensor topk_values, torch::Tensor topk_positions,
                           torch::Tensor offsets, torch::Tensor rowsum, int64_t impl, int64_t levels) {
  const torch::Tensor x = as_rows(xin);
  const TieredArgs a = check_tiered(x, tiers, dense, nm_values, nm_positions, topk_values, topk_positions, offsets);
  const int64_t R = a.R, C = a.C, k = a.k, Np = R * 16;
  check_q8(x, dense, rowsum, Np);  // check_tiered: every block array shares dense's dtype
  const bool vnni = use_vnni(impl);
  const Q8 xq = quantized(x, 16, vnni, levels);
  const int64_t B = xq.rows;
  auto sums = torch::empty({B, Np}, x.options().dtype(torch::kInt32));
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int8_t* tp = tiers.data_ptr<int8_t>();
  const int8_t* dp = dense.data_ptr<int8_t>();
  const int8_t* nv = nm_values.data_ptr<int8_t>();
  const uint32_t* np_ = reinterpret_cast<const uint32_t*>(nm_positions.data_ptr<int32_t>());
  const int8_t* kv = topk_values.data_ptr<int8_t>();
  const uint8_t* kp = topk_positions.data_ptr<uint8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  at::parallel_for(0, R, grain(C * 256 * B), [&](int64_t r0, int64_t r1) {
#ifdef HP_X86
    if (vnni) {
      const uint8_t* u = reinterpret_cast<const uint8_t*>(xq.q.data_ptr<int8_t>());
      const int32_t* rs = rowsum.data_ptr<int32_t>();
      for (int64_t Rb = r0; Rb < r1; Rb++)
        for (int64_t b0 = 0; b0 < B; b0 += BC) {
          const int64_t nb = std::min<int64_t>(BC, B - b0);
#define HP_TQ8(NB) tiered_q8_row<NB>(u + b0 * xq.Kx, xq.Kx, C, tp + Rb * C, dp, nv, np_, kv, kp, k, op[Rb * 3], \
                                     op[Rb * 3 + 1], op[Rb * 3 + 2], rs + Rb * 16, sp + b0 * Np + Rb * 16, Np)
          switch (nb) {
            case 1: HP_TQ8(1); break;
            case 2: HP_TQ8(2); break;
            case 3: HP_TQ8(3); break;
            default: HP_TQ8(4);
          }
#undef HP_TQ8
        }
      return;
    }
#endif
    tiered_q8_portable(xq.q.data_ptr<int8_t>(), B, xq.Kx, C, tp, dp, nv, np_, kv, kp, k, op, r0, r1, Np, sp);
  });
  return like_input(xin, scaled_by_rows(sums, xq.s, levels));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridprune: matrix products from packed sparse weights (AVX-512, AVX2+FMA and portable, same results)";
  m.def("unstructured_mm", &unstructured_mm, "x[B,Kp] @ W.T from a bitmask and kept values");
  m.def("nm24_mm", &nm24_mm, "x[B,K] @ W.T from 2:4 values and 2-bit positions");
  m.def("tiered_mm", &tiered_mm, "x[B,C*16] @ W.T from a 16x16 block tier map (dense / 2:4 / top-k)");
  m.def("int8_step", [](int64_t step) {
    TORCH_CHECK(step >= 0 && step <= 2, "int8_step: 0 (the CPU's), 1 (permute control) or 2 (vpexpandb)");
    return static_cast<int64_t>(g_int8_step.exchange(static_cast<int>(step)));
  }, "which 64-column step the AVX-512 unstructured int8 kernel takes (0: the CPU's); returns the previous");
  m.def("unstructured_decode", &unstructured_decode, "rows [r0, r1) of a bitmask-packed matrix into out, dense fp32");
  m.def("nm24_decode", &nm24_decode, "rows [r0, r1) of a 2:4-packed matrix into out, dense fp32");
  m.def("tiered_decode_t", &tiered_decode_t, "block rows [R0, R1) of a tiered matrix into out, dense fp32, transposed");
  m.def("unstructured_gemm", &unstructured_gemm, "x[B,Kp] @ W.T for large B: bitmask rows decoded 16 at a time (AVX-512 or AVX2)");
  m.def("nm24_gemm", &nm24_gemm, "x[B,K] @ W.T for large B: 2:4 rows decoded 16 at a time (AVX-512 or AVX2)");
  m.def("tiered_gemm", &tiered_gemm, "x[B,C*16] @ W.T for large B: tiered block rows decoded one at a time (AVX-512 or AVX2)");
  m.def("unstructured_mm_q8", &unstructured_mm_q8, "x @ W.T with x rounded to int8 per row (levels 2: and its rounding error), int8 bitmask-packed values");
  m.def("nm24_mm_q8", &nm24_mm_q8, "x @ W.T with x rounded to int8 per row (levels 2: and its rounding error), int8 2:4 values");
  m.def("tiered_mm_q8", &tiered_mm_q8, "x @ W.T with x rounded to int8 per row (levels 2: and its rounding error), int8 tiered blocks");
  m.def("has_vnni", &cpu_has_vnni, "whether this CPU runs the int8-activation path (AVX-512 VNNI, VBMI, VBMI2)");
  m.def("has_avx2", &cpu_has_avx2, "whether this CPU runs the AVX2+FMA path");
  m.def("has_avx512", &cpu_has_avx512, "whether this CPU runs the AVX-512 path (F, BW, VL, VBMI2)");
}
