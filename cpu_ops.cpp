// Integer dot-product kernels for quantized decoding on x86 CPUs, the route llama.cpp takes:
// each activation row is quantized once per call to int8 in blocks of 32 (one float scale a block), then every
// output is a sum over blocks of (integer dot product of 32 int8 activations with 32 int8 or 4-bit weights)
// times the two blocks' scales. Integer multiply-adds (AVX2 maddubs, or VNNI dpbusd where the CPU has it) do
// 32 products per instruction without widening the weights to float. The weights lie in tiles of 16 output
// channels, so one instruction takes 4 inputs of each of 16 channels against 4 activations broadcast: the
// float work per block is shared by 16 channels and the kernel stays memory-bound on two cores. Several
// activation rows (a drafted verification) share each weight load: the weights are read from memory once per
// call, whatever the number of rows.
//
// Built at first use by cpu_ops.py with -march=native for the CPU it runs on; cpu_ops.py times it against the
// other paths and keeps it only where it is faster. Plain C++ loops stand in where AVX2 is missing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 32;  // activation quantization block, and the unit of the integer dot product
constexpr int64_t MAX_ROWS = 8;  // activation rows kept in registers at once (a verification of up to 7 drafts)

// 8 values widened to float32: float, bfloat16 (float32's high half) or float16.
#if defined(__AVX2__)
template <typename T>
inline __m256 load_float8(const T* p);
template <>
inline __m256 load_float8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load_float8<c10::BFloat16>(const c10::BFloat16* p) {  // bfloat16 is float32's high half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
template <>
inline __m256 load_float8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 load_float8<int8_t>(const int8_t* p) {  // an int8 KV cache's entries (its scales applied apart)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// x [rows, K] (float, bfloat16 or float16) -> q int8 [rows, K], scale [rows, K/32], scaled_sum [rows, K/32]
// = scale * sum(q in block). q = round-half-even(x / scale) either way (the vector conversion rounds as
// nearbyint does), so the AVX2 loop and the plain one give the same bytes.
template <typename T>
void quantize_activations(const T* x, int64_t rows, int64_t K, int8_t* q, float* scale, float* scaled_sum) {
  const int64_t blocks = K / BLOCK;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* xb = x + r * K + b * BLOCK;
      int8_t* qb = q + r * K + b * BLOCK;
#if defined(__AVX2__)
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      for (int i = 0; i < 4; ++i) {
        v[i] = load_float8(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.f;
      const __m256 inverse = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
      // packs work within 128-bit lanes: 32-bit groups come out as 0 2 4 6 1 3 5 7 of the wanted order
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                          _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
      float values[BLOCK];
      float amax = 0.f;
      for (int64_t i = 0; i < BLOCK; ++i) {
        values[i] = static_cast<float>(xb[i]);
        amax = std::max(amax, std::fabs(values[i]));
      }
      const float d = amax / 127.f;
      const float inverse = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(values[i] * inverse));
        qb[i] = static_cast<int8_t>(v);
        sum += v;
      }
#endif
      scale[r * blocks + b] = d;
      scaled_sum[r * blocks + b] = d * static_cast<float>(sum);
    }
  }
}

#if defined(__AVX2__)
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Blocks of 32 inputs share a weight scale per group; groups are powers of two blocks (or one group per row),
// so a block's group is b >> group_shift, never a division in the inner loop.
inline int group_shift(int64_t K, int64_t groupsize) {
  const int64_t blocks_per_group = groupsize / BLOCK;
  TORCH_CHECK(groupsize % BLOCK == 0 && K % groupsize == 0, "groupsize must be a multiple of 32 dividing K");
  if (groupsize == K) return 62;  // one group: b >> 62 is 0
  TORCH_CHECK((blocks_per_group & (blocks_per_group - 1)) == 0, "groupsize / 32 must be a power of two");
  return __builtin_ctzll(blocks_per_group);
}

// With one or two rows, one chain of multiply-adds per row would wait on the previous one's latency every
// step; two accumulators (even and odd steps) keep two chains in flight.
template <int ROWS>
constexpr int chains() { return ROWS <= 2 ? 2 : 1; }

// 4-bit weights in tiles of TILE output channels (cpu_ops.int4_tiles), so that one vector holds 4 inputs of
// each of 16 channels and one integer dot-product instruction against 4 activations broadcast advances 16
// outputs at once: the per-block float work (convert, scale, accumulate) is shared by 16 channels instead of
// being repeated for each, and no channel ends in a horizontal sum. Within a tile, block b (32 inputs) is 4
// vectors of 64 bytes, vector j holding [channel i][byte k] = input 4j + k in the low nibble and 16 + 4j + k
// in the high one; value = d * q + m (q in 0..15), d and m float16 per channel and group, laid out
// [tile][group][channel]. The m terms need only each activation block's sum: m * scale * sum(q).
constexpr int64_t TILE = 16;
constexpr int64_t TILE_BLOCK_BYTES = TILE * BLOCK / 2;  // one block of 32 inputs of a tile's 16 channels

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX2__)
// The 8 channels [8h, 8h + 8) of vector j's int32 sums over its 4 inputs, low and high nibbles, added into
// dot: 256-bit VNNI where the CPU has it, else maddubs (pairs into int16, which the caller widens once a block:
// 8 pairs of at most 2 * 15 * 127 stay within int16).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
constexpr bool VNNI256 = true;
#else
constexpr bool VNNI256 = false;
#endif
inline __m256i nibble_dot(__m256i dot, __m256i nibbles, int32_t four_activations) {
  const __m256i x = _mm256_set1_epi32(four_activations);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(dot, nibbles, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(dot, nibbles, x);
#else
  return _mm256_add_epi16(dot, _mm256_maddubs_epi16(nibbles, x));
#endif
}
#endif

// How far ahead of its reads the int4 kernel asks for the weights (8 blocks of a tile, 2 KB): one thread reading
// a layer from memory went from 12-17 to 17-22 GB/s on Zen 4 with it (the prefetchers alone keep too few lines
// in flight), two threads from 18-25 to 24-31 GB/s (medians of 15 alternating runs, cold weights). Past the end
// of a thread's tiles it names the next ones' bytes, or none: a prefetch never faults.
constexpr int64_t PREFETCH_BYTES = 8 * TILE_BLOCK_BYTES;

// out[r, c] for the ROWS rows of one chunk and the channels of tiles [t_begin, t_end).
template <int ROWS>
void int4_tile_rows(const uint8_t* w, const c10::Half* w_d, const c10::Half* w_m, int64_t K, int shift,
                    const int8_t* xq, const float* x_scale, const float* x_scaled_sum, float* out, int64_t N,
                    int64_t t_begin, int64_t t_end) {
  const int64_t blocks = K / BLOCK, groups = (blocks - 1 >> shift) + 1;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* wt = w + t * blocks * TILE_BLOCK_BYTES;
    const c10::Half* dt = w_d + t * groups * TILE;
    const c10::Half* mt = w_m + t * groups * TILE;
    alignas(64) float result[ROWS][TILE];
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F), high_nibbles = _mm512_set1_epi8(static_cast<char>(0xF0));
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = wt + b * TILE_BLOCK_BYTES;
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH_BYTES + 64 * j), _MM_HINT_T0);
      constexpr int C = chains<ROWS>();  // low and high nibbles in two dependency chains at one or two rows
      __m512i dot[ROWS][C];
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        const __m512i packed = _mm512_loadu_si512(wb + 64 * j);
        const __m512i lo = _mm512_and_si512(packed, low_nibbles);
        // In their own chain (C == 2), the high nibbles stay in place (w & 0xF0 = 16 x the nibble) and their
        // sum is scaled by 1/16 in float: exact (the int32 sums stay far below 2^24), one shift fewer a vector.
        const __m512i hi = C == 2 ? _mm512_and_si512(packed, high_nibbles)
                                  : _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
        for (int r = 0; r < ROWS; ++r) {
          const int8_t* xb = xq + r * K + b * BLOCK;
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], lo, _mm512_set1_epi32(four_bytes(xb + 4 * j)));
          dot[r][C - 1] = _mm512_dpbusd_epi32(dot[r][C - 1], hi, _mm512_set1_epi32(four_bytes(xb + 16 + 4 * j)));
        }
      }
      const int64_t g = b >> shift;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt + g * TILE)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt + g * TILE)));
      for (int r = 0; r < ROWS; ++r) {
        const __m512 sums = C == 2 ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][C - 1]), _mm512_set1_ps(1.f / 16),
                                                     _mm512_cvtepi32_ps(dot[r][0]))
                                   : _mm512_cvtepi32_ps(dot[r][0]);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x_scale[r * blocks + b])), sums, acc[r]);
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x_scaled_sum[r * blocks + b]), acc[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) _mm512_store_ps(result[r], acc[r]);
#elif defined(__AVX2__)
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {  // the tile's two halves of 8 channels, one 256-bit vector each
      __m256 acc[ROWS];
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* wb = wt + b * TILE_BLOCK_BYTES + 32 * h;
        __m256i dot[ROWS];
        for (int r = 0; r < ROWS; ++r) dot[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
          const __m256i lo = _mm256_and_si256(packed, low_nibbles);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
          for (int r = 0; r < ROWS; ++r) {
            const int8_t* xb = xq + r * K + b * BLOCK;
            dot[r] = nibble_dot(nibble_dot(dot[r], lo, four_bytes(xb + 4 * j)), hi, four_bytes(xb + 16 + 4 * j));
          }
        }
        const int64_t g = b >> shift;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dt + g * TILE + 8 * h)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mt + g * TILE + 8 * h)));
        for (int r = 0; r < ROWS; ++r) {
          const __m256i sums32 = VNNI256 ? dot[r] : _mm256_madd_epi16(dot[r], _mm256_set1_epi16(1));
          acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x_scale[r * blocks + b])),
                                   _mm256_cvtepi32_ps(sums32), acc[r]);
          acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x_scaled_sum[r * blocks + b]), acc[r]);
        }
      }
      for (int r = 0; r < ROWS; ++r) _mm256_store_ps(result[r] + 8 * h, acc[r]);
    }
#else
    for (int r = 0; r < ROWS; ++r)
      for (int64_t i = 0; i < TILE; ++i) {
        float total = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* wb = wt + b * TILE_BLOCK_BYTES;
          const int8_t* xb = xq + r * K + b * BLOCK;
          int32_t dot = 0;
          for (int j = 0; j < 4; ++j)
            for (int k = 0; k < 4; ++k) {
              const uint8_t byte = wb[64 * j + 4 * i + k];
              dot += int32_t(byte & 0xF) * xb[4 * j + k] + int32_t(byte >> 4) * xb[16 + 4 * j + k];
            }
          const int64_t g = b >> shift;
          total += static_cast<float>(dt[g * TILE + i]) * x_scale[r * blocks + b] * float(dot)
                   + static_cast<float>(mt[g * TILE + i]) * x_scaled_sum[r * blocks + b];
        }
        result[r][i] = total;
      }
#endif
    const int64_t channels = std::min(TILE, N - t * TILE);  // the last tile's padding channels are dropped
    for (int r = 0; r < ROWS; ++r) std::memcpy(out + r * N + t * TILE, result[r], channels * sizeof(float));
  }
}

// int8 weights in the same tiles of 16 channels (cpu_ops.int8_tiles): per tile and block of 32 inputs, 8 vectors
// of 64 bytes, vector j holding [channel i][byte k] = input 4j + k; float32 scales [tile][group][channel].
// VNNI multiplies unsigned bytes by signed ones: the weights go in as w + 128 (w XOR 0x80) and each block
// takes 128 * scale * sum(activations) back off, from the activation sums the quantization already made.
// Without VNNI, maddubs takes |x| and w with x's sign (the weights must then lie within [-127, 127]).
constexpr int64_t INT8_TILE_BLOCK_BYTES = TILE * BLOCK;

template <int ROWS>
void int8_tile_rows(const int8_t* w, const float* w_scale, int64_t K, int shift, const int8_t* xq,
                    const float* x_scale, const float* x_scaled_sum, float* out, int64_t N, int64_t t_begin,
                    int64_t t_end) {
  const int64_t blocks = K / BLOCK, groups = (blocks - 1 >> shift) + 1;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int8_t* wt = w + t * blocks * INT8_TILE_BLOCK_BYTES;
    const float* st = w_scale + t * groups * TILE;
    alignas(64) float result[ROWS][TILE];
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* wb = wt + b * INT8_TILE_BLOCK_BYTES;
      constexpr int C = chains<ROWS>();  // even and odd vectors in two dependency chains at one or two rows
      __m512i dot[ROWS][C];
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(wb + 64 * j), flip);
        for (int r = 0; r < ROWS; ++r)
          dot[r][j % C] = _mm512_dpbusd_epi32(dot[r][j % C], u, _mm512_set1_epi32(four_bytes(xq + r * K + b * BLOCK + 4 * j)));
      }
      const __m512 s = _mm512_loadu_ps(st + (b >> shift) * TILE);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 sums = _mm512_cvtepi32_ps(C == 2 ? _mm512_add_epi32(dot[r][0], dot[r][C - 1]) : dot[r][0]);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(x_scale[r * blocks + b])), sums, acc[r]);
        acc[r] = _mm512_fmadd_ps(s, _mm512_set1_ps(-128.f * x_scaled_sum[r * blocks + b]), acc[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) _mm512_store_ps(result[r], acc[r]);
#elif defined(__AVX2__)
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int h = 0; h < 2; ++h) {  // the tile's two halves of 8 channels, one 256-bit vector each
      __m256 acc[ROWS];
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* wb = wt + b * INT8_TILE_BLOCK_BYTES + 32 * h;
        __m256i dot[ROWS];
        for (int r = 0; r < ROWS; ++r) dot[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
          const __m256i u = _mm256_xor_si256(wv, flip);
          for (int r = 0; r < ROWS; ++r) {
            const __m256i x = _mm256_set1_epi32(four_bytes(xq + r * K + b * BLOCK + 4 * j));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            dot[r] = _mm256_dpbusd_epi32(dot[r], u, x);
#elif defined(__AVXVNNI__)
            dot[r] = _mm256_dpbusd_avx_epi32(dot[r], u, x);
#else
            (void)u;
            const __m256i products = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(wv, x));
            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
#endif
          }
        }
        const __m256 s = _mm256_loadu_ps(st + (b >> shift) * TILE + 8 * h);
        for (int r = 0; r < ROWS; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(x_scale[r * blocks + b])),
                                   _mm256_cvtepi32_ps(dot[r]), acc[r]);
          if (VNNI256) acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(-128.f * x_scaled_sum[r * blocks + b]), acc[r]);
        }
      }
      for (int r = 0; r < ROWS; ++r) _mm256_store_ps(result[r] + 8 * h, acc[r]);
    }
#else
    for (int r = 0; r < ROWS; ++r)
      for (int64_t i = 0; i < TILE; ++i) {
        float total = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          const int8_t* wb = wt + b * INT8_TILE_BLOCK_BYTES;
          int32_t dot = 0;
          for (int j = 0; j < 8; ++j)
            for (int k = 0; k < 4; ++k) dot += int32_t(wb[64 * j + 4 * i + k]) * xq[r * K + b * BLOCK + 4 * j + k];
          total += st[(b >> shift) * TILE + i] * x_scale[r * blocks + b] * float(dot);
        }
        result[r][i] = total;
      }
#endif
    const int64_t channels = std::min(TILE, N - t * TILE);  // the last tile's padding channels are dropped
    for (int r = 0; r < ROWS; ++r) std::memcpy(out + r * N + t * TILE, result[r], channels * sizeof(float));
  }
}

#if defined(__AVX512F__)
// exp(x), x clamped to [-80, 80]: 2^n * 2^f, n = round(x log2(e)), |f| <= 1/2, relative error ~2e-7. Below -80 it
// is exp(-80) (1.8e-35, a normal float): results near the denormals would each cost a microcode assist.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-80.f)), _mm512_set1_ps(80.f)), _mm512_set1_ps(1.44269504089f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__)
inline __m256 exp8(__m256 x) {  // as exp16, the power of two built in the exponent bits
  const __m256 t = _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-80.f)), _mm256_set1_ps(80.f)), _mm256_set1_ps(1.44269504089f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}
#endif

// A call's activation rows quantized once, before the threads start, into buffers kept between calls (no
// allocation per call). Raw pointers, so that the worker threads read the calling thread's buffers.
struct QuantizedRows {
  int64_t rows, K, blocks;
  const int8_t* q;
  const float* scale;
  const float* scaled_sum;
};

QuantizedRows quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be [rows, K]");
  const int64_t rows = x.size(0), K = x.size(1), blocks = K / BLOCK;
  TORCH_CHECK(K % BLOCK == 0, "K must be a multiple of 32");
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> x_scale, x_scaled_sum;
  xq.resize(rows * K);
  x_scale.resize(rows * blocks);
  x_scaled_sum.resize(rows * blocks);
  switch (x.scalar_type()) {
    case at::kFloat: quantize_activations(x.data_ptr<float>(), rows, K, xq.data(), x_scale.data(), x_scaled_sum.data()); break;
    case at::kBFloat16: quantize_activations(x.data_ptr<c10::BFloat16>(), rows, K, xq.data(), x_scale.data(), x_scaled_sum.data()); break;
    case at::kHalf: quantize_activations(x.data_ptr<c10::Half>(), rows, K, xq.data(), x_scale.data(), x_scaled_sum.data()); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return {rows, K, blocks, xq.data(), x_scale.data(), x_scaled_sum.data()};
}

// A task of at least ~64K multiply-adds: smaller products run on one thread, where waking the others costs more.
inline int64_t grain_of(int64_t K, int64_t rows, int64_t unit) {
  return (std::max<int64_t>(8, (1 << 16) / (K * rows)) + unit - 1) / unit;
}

// Runs `launch` over row chunks of at most MAX_ROWS and output units (channels, or tiles of `unit` channels)
// split between threads; each thread reads its weights once per chunk, and a chunk's quantized activations stay
// in L1.
template <typename Launch>
at::Tensor run_chunks(const at::Tensor& x_in, int64_t N, int64_t unit, const Launch& launch) {
  const at::Tensor x = x_in.contiguous();
  const QuantizedRows a = quantize_rows(x);
  const int64_t rows = a.rows, K = a.K, blocks = a.blocks;
  thread_local std::vector<float> out_float;
  at::Tensor out = at::empty({rows, N}, x.options());
  const bool float_out = x.scalar_type() == at::kFloat;
  if (!float_out) out_float.resize(rows * N);
  float* result = float_out ? out.data_ptr<float>() : out_float.data();
  at::parallel_for(0, (N + unit - 1) / unit, grain_of(K, rows, unit), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
      launch(std::min(MAX_ROWS, rows - r0), a.q + r0 * K, a.scale + r0 * blocks, a.scaled_sum + r0 * blocks,
             result + r0 * N, n_begin, n_end);
    }
  });
  if (!float_out) {
    if (x.scalar_type() == at::kBFloat16) {
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < rows * N; ++i) o[i] = c10::BFloat16(out_float[i]);
    } else {
      c10::Half* o = out.data_ptr<c10::Half>();
      for (int64_t i = 0; i < rows * N; ++i) o[i] = c10::Half(out_float[i]);
    }
  }
  return out;
}

// silu(x W1^T) * (x W3^T), a gated feed-forward's first half, in one call: `launch(chunk, ..., gate, up, t_begin,
// t_end)` computes tiles [t_begin, t_end) of both products, and the same thread multiplies them while they are
// in its cache (rounded once, to x's dtype). One call and one pass over the threads where there were three.
template <typename Out>
inline void silu_times(float* gate, const float* up, Out* out, int64_t count) {
  int64_t i = 0;  // silu(g) u = g u / (1 + exp(-g)), in gate's buffer, then rounded once into out
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(gate + i, _mm512_div_ps(_mm512_mul_ps(g, _mm512_loadu_ps(up + i)), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  }
#elif defined(__AVX2__)
  for (; i + 8 <= count; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(gate + i, _mm256_div_ps(_mm256_mul_ps(g, _mm256_loadu_ps(up + i)), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
  }
#endif
  for (; i < count; ++i) gate[i] = gate[i] * up[i] / (1.f + std::exp(-gate[i]));
  for (i = 0; i < count; ++i) out[i] = static_cast<Out>(gate[i]);
}

template <typename Launch>
at::Tensor run_gated_chunks(const at::Tensor& x_in, int64_t N, const Launch& launch) {
  const at::Tensor x = x_in.contiguous();
  const QuantizedRows a = quantize_rows(x);
  const int64_t rows = a.rows, K = a.K, blocks = a.blocks;
  thread_local std::vector<float> gate_buffer, up_buffer;
  gate_buffer.resize(rows * N);
  up_buffer.resize(rows * N);
  float* gate = gate_buffer.data();
  float* up = up_buffer.data();
  at::Tensor out = at::empty({rows, N}, x.options());
  at::parallel_for(0, (N + TILE - 1) / TILE, grain_of(K, 2 * rows, TILE), [&](int64_t t_begin, int64_t t_end) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS)
      launch(std::min(MAX_ROWS, rows - r0), a.q + r0 * K, a.scale + r0 * blocks, a.scaled_sum + r0 * blocks,
             gate + r0 * N, up + r0 * N, t_begin, t_end);
    const int64_t c0 = t_begin * TILE, count = std::min(N, t_end * TILE) - c0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = r * N + c0;
      switch (x.scalar_type()) {
        case at::kFloat: silu_times(gate + at, up + at, out.data_ptr<float>() + at, count); break;
        case at::kBFloat16: silu_times(gate + at, up + at, out.data_ptr<c10::BFloat16>() + at, count); break;
        default: silu_times(gate + at, up + at, out.data_ptr<c10::Half>() + at, count); break;
      }
    }
  });
  return out;
}

#define DISPATCH_ROWS(chunk, KERNEL, ...)              \
  switch (chunk) {                                     \
    case 1: KERNEL<1>(__VA_ARGS__); break;             \
    case 2: KERNEL<2>(__VA_ARGS__); break;             \
    case 3: KERNEL<3>(__VA_ARGS__); break;             \
    case 4: KERNEL<4>(__VA_ARGS__); break;             \
    case 5: KERNEL<5>(__VA_ARGS__); break;             \
    case 6: KERNEL<6>(__VA_ARGS__); break;             \
    case 7: KERNEL<7>(__VA_ARGS__); break;             \
    default: KERNEL<8>(__VA_ARGS__); break;            \
  }

// A quantized layer's native layout: its pieces' dtypes and sizes (tensors, or pieces of a block's region).
void check_int8_pieces(bool tiles_ok, int64_t tiles_numel, bool scales_ok, int64_t scales_numel, int64_t K,
                       int64_t groupsize, int64_t N) {
  const int64_t tile_count = (N + TILE - 1) / TILE;
  TORCH_CHECK(tiles_ok && tiles_numel == tile_count * TILE * K, "tiles must be contiguous int8 from cpu_ops.int8_tiles");
  TORCH_CHECK(scales_ok && scales_numel == tile_count * TILE * (K / groupsize),
              "scales must be contiguous float32 [tiles, K/groupsize, 16]");
}

void check_int4_pieces(bool tiles_ok, int64_t tiles_numel, bool dm_ok, int64_t d_numel, int64_t m_numel, int64_t K,
                       int64_t groupsize, int64_t N) {
  const int64_t tile_count = (N + TILE - 1) / TILE;
  TORCH_CHECK(tiles_ok && tiles_numel == tile_count * TILE * K / 2, "tiles must be contiguous uint8 from cpu_ops.int4_tiles");
  TORCH_CHECK(dm_ok && d_numel == tile_count * TILE * (K / groupsize) && m_numel == d_numel,
              "d and m must be contiguous float16 [tiles, K/groupsize, 16]");
}

void check_int8_layer(const at::Tensor& tiles, const at::Tensor& scales, int64_t K, int64_t groupsize, int64_t N) {
  check_int8_pieces(tiles.scalar_type() == at::kChar && tiles.is_contiguous(), tiles.numel(),
                    scales.scalar_type() == at::kFloat && scales.is_contiguous(), scales.numel(), K, groupsize, N);
}

void check_int4_layer(const at::Tensor& tiles, const at::Tensor& d, const at::Tensor& m, int64_t K, int64_t groupsize,
                      int64_t N) {
  check_int4_pieces(tiles.scalar_type() == at::kByte && tiles.is_contiguous(), tiles.numel(),
                    d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.is_contiguous() && m.is_contiguous(),
                    d.numel(), m.numel(), K, groupsize, N);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales, int64_t groupsize,
                       int64_t N) {
  const int64_t K = x.size(-1);
  check_int8_layer(tiles, scales, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const int8_t* w = tiles.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  return run_chunks(x, N, TILE, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float* x_sum,
                                    float* out, int64_t t_begin, int64_t t_end) {
    DISPATCH_ROWS(chunk, int8_tile_rows, w, s, K, shift, xq, x_scale, x_sum, out, N, t_begin, t_end)
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& d, const at::Tensor& m,
                       int64_t groupsize, int64_t N) {
  const int64_t K = x.size(-1);
  check_int4_layer(tiles, d, m, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const c10::Half* mp = m.data_ptr<c10::Half>();
  return run_chunks(x, N, TILE, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float* x_sum,
                                    float* out, int64_t t_begin, int64_t t_end) {
    DISPATCH_ROWS(chunk, int4_tile_rows, w, dp, mp, K, shift, xq, x_scale, x_sum, out, N, t_begin, t_end)
  });
}

// ---------------------------------------------------------------- tiles back to plain weights
// A prompt's product (many rows) reads a quantized layer's weights once per call whatever its row count, so
// its weights may be widened first and handed to the float matrix product (oneDNN: AMX or AVX512_BF16 where
// the CPU has them): channels [n_begin, n_end) of the tiles as plain [n, K] rows of `dtype`, the float model's
// weights (int8: q * s; int4: q * d + m), so that the layer keeps one layout, the tiles, for decode and prompts.

// Rounds 16 (or 8) float32 to the output type and stores them.
template <typename Out> inline void store_row(Out* out, const float* values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Out>(values[i]);
}
#if defined(__AVX512F__)
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(c10::BFloat16* out, __m512 v) {  // round to nearest even (weights are finite)
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

template <typename Out>
void int4_rows_of_tile(const uint8_t* w, const c10::Half* d, const c10::Half* m, int64_t K, int shift,
                       int64_t tile, int64_t channels, Out* out) {
  const int64_t blocks = K / BLOCK, groups = (shift == 62) ? 1 : blocks >> shift;
  for (int64_t c = 0; c < channels; ++c) {
    Out* row = out + c * K;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* src = w + (tile * blocks + b) * (TILE * BLOCK / 2) + c * 4;
      const int64_t at = (tile * groups + (b >> shift)) * TILE + c;
      const float dd = static_cast<float>(d[at]), mm = static_cast<float>(m[at]);
#if defined(__AVX512F__)
      int32_t words[4];
      for (int j = 0; j < 4; ++j) std::memcpy(&words[j], src + j * TILE * 4, 4);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words));  // inputs 0-15 | 16-31 << 4
      const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
      const __m512 vd = _mm512_set1_ps(dd), vm = _mm512_set1_ps(mm);
      store16(row + b * BLOCK, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low)), vd, vm));
      store16(row + b * BLOCK + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high)), vd, vm));
#else
      float values[BLOCK];
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 4; ++k) {
          const uint8_t byte = src[j * TILE * 4 + k];
          values[4 * j + k] = static_cast<float>(byte & 15) * dd + mm;
          values[16 + 4 * j + k] = static_cast<float>(byte >> 4) * dd + mm;
        }
      store_row(row + b * BLOCK, values, BLOCK);
#endif
    }
  }
}

template <typename Out>
void int8_rows_of_tile(const int8_t* w, const float* scales, int64_t K, int shift, int64_t tile,
                       int64_t channels, Out* out) {
  const int64_t blocks = K / BLOCK, groups = (shift == 62) ? 1 : blocks >> shift;
  for (int64_t c = 0; c < channels; ++c) {
    Out* row = out + c * K;
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* src = w + (tile * blocks + b) * (TILE * BLOCK) + c * 4;
      const float scale = scales[(tile * groups + (b >> shift)) * TILE + c];
#if defined(__AVX512F__)
      int32_t words[8];
      for (int j = 0; j < 8; ++j) std::memcpy(&words[j], src + j * TILE * 4, 4);
      const __m512 vs = _mm512_set1_ps(scale);
      for (int half = 0; half < 2; ++half) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 4 * half));
        store16(row + b * BLOCK + 16 * half, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), vs));
      }
#else
      float values[BLOCK];
      for (int j = 0; j < 8; ++j)
        for (int k = 0; k < 4; ++k) values[4 * j + k] = static_cast<float>(src[j * TILE * 4 + k]) * scale;
      store_row(row + b * BLOCK, values, BLOCK);
#endif
    }
  }
}

// Channels [n_begin, n_end) of the tiles as [n_end - n_begin, K] of `dtype`, each thread a range of tiles.
template <typename RowsOfTile>
at::Tensor rows_from_tiles(int64_t K, int64_t N, int64_t n_begin, int64_t n_end, at::ScalarType dtype,
                           const RowsOfTile& rows_of_tile) {
  TORCH_CHECK(0 <= n_begin && n_begin < n_end && n_end <= N && n_begin % TILE == 0,
              "need 0 <= n_begin < n_end <= out_features, n_begin a multiple of 16");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "dtype must be float32, bfloat16 or float16");
  at::Tensor out = at::empty({n_end - n_begin, K}, at::TensorOptions().dtype(dtype));
  const int64_t first = n_begin / TILE, last = (n_end + TILE - 1) / TILE;
  at::parallel_for(first, last, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t channels = std::min<int64_t>(TILE, n_end - t * TILE);  // the last tile may be partial
      const int64_t offset = (t * TILE - n_begin) * K;
      switch (dtype) {
        case at::kFloat: rows_of_tile(t, channels, out.data_ptr<float>() + offset); break;
        case at::kBFloat16: rows_of_tile(t, channels, out.data_ptr<c10::BFloat16>() + offset); break;
        default: rows_of_tile(t, channels, out.data_ptr<c10::Half>() + offset); break;
      }
    }
  });
  return out;
}

at::Tensor int4_weight_rows(const at::Tensor& tiles, const at::Tensor& d, const at::Tensor& m, int64_t groupsize,
                            int64_t K, int64_t N, int64_t n_begin, int64_t n_end, at::ScalarType dtype) {
  check_int4_layer(tiles, d, m, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const uint8_t* w = tiles.data_ptr<uint8_t>();
  const c10::Half *dp = d.data_ptr<c10::Half>(), *mp = m.data_ptr<c10::Half>();
  return rows_from_tiles(K, N, n_begin, n_end, dtype, [&](int64_t t, int64_t channels, auto* out) {
    int4_rows_of_tile(w, dp, mp, K, shift, t, channels, out);
  });
}

at::Tensor int8_weight_rows(const at::Tensor& tiles, const at::Tensor& scales, int64_t groupsize, int64_t K,
                            int64_t N, int64_t n_begin, int64_t n_end, at::ScalarType dtype) {
  check_int8_layer(tiles, scales, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const int8_t* w = tiles.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return rows_from_tiles(K, N, n_begin, n_end, dtype, [&](int64_t t, int64_t channels, auto* out) {
    int8_rows_of_tile(w, sp, K, shift, t, channels, out);
  });
}

// silu(x W1^T) * (x W3^T) for two int8 layers of one shape (a gated feed-forward's gate and up projections).
at::Tensor int8_gated_linear(const at::Tensor& x, const at::Tensor& gate_tiles, const at::Tensor& gate_scales,
                             const at::Tensor& up_tiles, const at::Tensor& up_scales, int64_t groupsize, int64_t N) {
  const int64_t K = x.size(-1);
  check_int8_layer(gate_tiles, gate_scales, K, groupsize, N);
  check_int8_layer(up_tiles, up_scales, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const int8_t *w1 = gate_tiles.data_ptr<int8_t>(), *w3 = up_tiles.data_ptr<int8_t>();
  const float *s1 = gate_scales.data_ptr<float>(), *s3 = up_scales.data_ptr<float>();
  return run_gated_chunks(x, N, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float* x_sum,
                                    float* gate, float* up, int64_t t_begin, int64_t t_end) {
    DISPATCH_ROWS(chunk, int8_tile_rows, w1, s1, K, shift, xq, x_scale, x_sum, gate, N, t_begin, t_end)
    DISPATCH_ROWS(chunk, int8_tile_rows, w3, s3, K, shift, xq, x_scale, x_sum, up, N, t_begin, t_end)
  });
}

// The same for two int4 layers.
at::Tensor int4_gated_linear(const at::Tensor& x, const at::Tensor& gate_tiles, const at::Tensor& gate_d,
                             const at::Tensor& gate_m, const at::Tensor& up_tiles, const at::Tensor& up_d,
                             const at::Tensor& up_m, int64_t groupsize, int64_t N) {
  const int64_t K = x.size(-1);
  check_int4_layer(gate_tiles, gate_d, gate_m, K, groupsize, N);
  check_int4_layer(up_tiles, up_d, up_m, K, groupsize, N);
  const int shift = group_shift(K, groupsize);
  const uint8_t *w1 = gate_tiles.data_ptr<uint8_t>(), *w3 = up_tiles.data_ptr<uint8_t>();
  const c10::Half *d1 = gate_d.data_ptr<c10::Half>(), *m1 = gate_m.data_ptr<c10::Half>();
  const c10::Half *d3 = up_d.data_ptr<c10::Half>(), *m3 = up_m.data_ptr<c10::Half>();
  return run_gated_chunks(x, N, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float* x_sum,
                                    float* gate, float* up, int64_t t_begin, int64_t t_end) {
    DISPATCH_ROWS(chunk, int4_tile_rows, w1, d1, m1, K, shift, xq, x_scale, x_sum, gate, N, t_begin, t_end)
    DISPATCH_ROWS(chunk, int4_tile_rows, w3, d3, m3, K, shift, xq, x_scale, x_sum, up, N, t_begin, t_end)
  });
}

// ---------------------------------------------------------------- 16- and 32-bit float weights
// One decoded token reads each weight once and does one multiply-add with it: memory-bound. A verification of
// several drafted tokens does one multiply-add per row with each weight it has read and widened to float32:
// up to 8 rows cost about as much memory traffic as one, which is what makes drafting pay.


#if defined(__AVX512F__)
// 16 weights at a time where the CPU has AVX-512: half the loads, conversions and multiply-adds per weight of
// the 8-wide loop, which on two cores is what keeps a one-row product from reaching memory speed.
template <typename W>
inline __m512 load_float16(const W* w);
template <>
inline __m512 load_float16<float>(const float* w) { return _mm512_loadu_ps(w); }
template <>
inline __m512 load_float16<c10::BFloat16>(const c10::BFloat16* w) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
template <>
inline __m512 load_float16<c10::Half>(const c10::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
template <>
inline __m512 load_float16<int8_t>(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
#endif

template <int ROWS, typename W>
void float_rows(const W* w, int64_t K, const float* x, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* wn = w + n * K;
    int64_t k = 0;
    float tail[ROWS] = {};
#if defined(__AVX512F__)
    constexpr int C = chains<ROWS>();  // two accumulators per row at one or two rows: two FMA chains in flight
    __m512 acc[C][ROWS];
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_setzero_ps();
    for (; k + 16 * C <= K; k += 16 * C)
      for (int c = 0; c < C; ++c) {
        const __m512 wv = load_float16(wn + k + 16 * c);
        for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k + 16 * c), acc[c][r]);
      }
    for (int r = 0; r < ROWS; ++r) {
      __m512 total = acc[0][r];
      for (int c = 1; c < C; ++c) total = _mm512_add_ps(total, acc[c][r]);
      tail[r] = _mm512_reduce_add_ps(total);
    }
#elif defined(__AVX2__)
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load_float8(wn + k);
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < ROWS; ++r) tail[r] = horizontal_sum(acc[r]);
#endif
    for (; k < K; ++k) {
      const float wk = static_cast<float>(wn[k]);
      for (int r = 0; r < ROWS; ++r) tail[r] += wk * x[r * K + k];
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = tail[r];
  }
}

#if defined(__AVX512BF16__)
// Two to eight rows of bfloat16 activations against bfloat16 weights, where the CPU has AVX512_BF16: one
// vdpbf16ps multiplies 32 weight-activation pairs (exactly: bf16 products fit float32) and adds them into 16
// float32 sums, where the float path widens the weights (two instructions per 16) and does a multiply-add per
// row for each 16. Decoding one row reads weights from memory and gains nothing from it (measured); a
// verification of several rows is bound by that arithmetic instead: 1536x576, 5 rows, 71.6 us on the float path.
template <int ROWS>
void bf16_pair_rows(const c10::BFloat16* w, int64_t K, const c10::BFloat16* x, float* out, int64_t N,
                    int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {  // one channel at a time (two side by side: 1.5-2.3x slower, measured)
    const c10::BFloat16* wn = w + n * K;
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k);
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(x + r * K + k));
    }
    for (int r = 0; r < ROWS; ++r) {
      float total = _mm512_reduce_add_ps(acc[r]);
      for (int64_t j = k; j < K; ++j) total += static_cast<float>(wn[j]) * static_cast<float>(x[r * K + j]);
      out[r * N + n] = total;
    }
  }
}
#endif

// rows (<= 8) of activations x (float32, and xb: the same in bfloat16 when they were bfloat16, else null)
// times the weight's channels [n_begin, n_end)
template <typename W>
void float_product(const W* w, int64_t K, const float* x, const c10::BFloat16* xb, float* out, int64_t N,
                   int64_t rows, int64_t n_begin, int64_t n_end) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (xb != nullptr && rows >= 2) {
      DISPATCH_ROWS(rows, bf16_pair_rows, w, K, xb, out, N, n_begin, n_end)
      return;
    }
  }
#endif
  DISPATCH_ROWS(rows, float_rows, w, K, x, out, N, n_begin, n_end)
}

template <typename T>
void to_float(const T* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

template <typename T>
void from_float(const float* in, T* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(in[i]);
}

template <typename W>
void float_linear_typed(const float* x, const c10::BFloat16* xb, const W* w, float* out, int64_t rows, int64_t K,
                        int64_t N) {
  const int64_t grain = std::max<int64_t>(8, (1 << 16) / (K * rows));
  at::parallel_for(0, N, grain, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS)
      float_product(w, K, x + r0 * K, xb ? xb + r0 * K : nullptr, out + r0 * N, N, std::min(MAX_ROWS, rows - r0),
                    n_begin, n_end);
  });
}

// silu(x W1^T) * (x W3^T) for two float weights of one shape and dtype: both products of a thread's channels,
// then their SiLU product while they are in its cache (as run_gated_chunks does for the integer kernels).
template <typename W, typename Out>
void float_gated_typed(const float* x, const c10::BFloat16* xb, const W* w1, const W* w3, float* gate, float* up,
                       Out* out, int64_t rows, int64_t K, int64_t N) {
  at::parallel_for(0, N, std::max<int64_t>(8, (1 << 16) / (2 * K * rows)), [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
      const int64_t chunk = std::min(MAX_ROWS, rows - r0);
      const c10::BFloat16* xc = xb ? xb + r0 * K : nullptr;
      float_product(w1, K, x + r0 * K, xc, gate + r0 * N, N, chunk, n_begin, n_end);
      float_product(w3, K, x + r0 * K, xc, up + r0 * N, N, chunk, n_begin, n_end);
    }
    for (int64_t r = 0; r < rows; ++r)
      silu_times(gate + r * N + n_begin, up + r * N + n_begin, out + r * N + n_begin, n_end - n_begin);
  });
}

template <typename W>
void float_gated_weights(const at::Tensor& x, const float* xf, const W* w1, const W* w3, float* gate, float* up,
                         at::Tensor& out, int64_t rows, int64_t K, int64_t N) {
  switch (x.scalar_type()) {
    case at::kFloat: float_gated_typed(xf, nullptr, w1, w3, gate, up, out.data_ptr<float>(), rows, K, N); break;
    case at::kBFloat16:
      float_gated_typed(xf, x.data_ptr<c10::BFloat16>(), w1, w3, gate, up, out.data_ptr<c10::BFloat16>(), rows, K, N);
      break;
    default: float_gated_typed(xf, nullptr, w1, w3, gate, up, out.data_ptr<c10::Half>(), rows, K, N); break;
  }
}

at::Tensor float_gated_linear(const at::Tensor& x_in, const at::Tensor& gate_weight, const at::Tensor& up_weight) {
  TORCH_CHECK(x_in.dim() == 2 && gate_weight.dim() == 2 && gate_weight.sizes() == up_weight.sizes()
              && x_in.size(1) == gate_weight.size(1), "x [rows, K], gate and up weights [N, K]");
  TORCH_CHECK(gate_weight.is_contiguous() && up_weight.is_contiguous()
              && gate_weight.scalar_type() == up_weight.scalar_type(), "weights must be contiguous, of one dtype");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), K = x.size(1), N = gate_weight.size(0);
  thread_local std::vector<float> x_float, gate_buffer, up_buffer;
  x_float.resize(rows * K);
  gate_buffer.resize(rows * N);
  up_buffer.resize(rows * N);
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(x_float.data(), x.data_ptr<float>(), rows * K * sizeof(float)); break;
    case at::kBFloat16: to_float(x.data_ptr<c10::BFloat16>(), x_float.data(), rows * K); break;
    case at::kHalf: to_float(x.data_ptr<c10::Half>(), x_float.data(), rows * K); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  at::Tensor out = at::empty({rows, N}, x.options());
  float *xf = x_float.data(), *gate = gate_buffer.data(), *up = up_buffer.data();
  switch (gate_weight.scalar_type()) {
    case at::kFloat: float_gated_weights(x, xf, gate_weight.data_ptr<float>(), up_weight.data_ptr<float>(), gate, up, out, rows, K, N); break;
    case at::kBFloat16: float_gated_weights(x, xf, gate_weight.data_ptr<c10::BFloat16>(), up_weight.data_ptr<c10::BFloat16>(), gate, up, out, rows, K, N); break;
    case at::kHalf: float_gated_weights(x, xf, gate_weight.data_ptr<c10::Half>(), up_weight.data_ptr<c10::Half>(), gate, up, out, rows, K, N); break;
    default: TORCH_CHECK(false, "weights must be float32, bfloat16 or float16");
  }
  return out;
}

// y [rows, N] = x [rows, K] @ weight [N, K]^T (+ bias), accumulated in float32, in x's dtype.
at::Tensor float_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && x_in.size(1) == weight.size(1), "x [rows, K], weight [N, K]");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  thread_local std::vector<float> x_float, out_float;
  x_float.resize(rows * K);
  out_float.resize(rows * N);
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(x_float.data(), x.data_ptr<float>(), rows * K * sizeof(float)); break;
    case at::kBFloat16: to_float(x.data_ptr<c10::BFloat16>(), x_float.data(), rows * K); break;
    case at::kHalf: to_float(x.data_ptr<c10::Half>(), x_float.data(), rows * K); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  const c10::BFloat16* xb = x.scalar_type() == at::kBFloat16 ? x.data_ptr<c10::BFloat16>() : nullptr;
  switch (weight.scalar_type()) {
    case at::kFloat: float_linear_typed(x_float.data(), xb, weight.data_ptr<float>(), out_float.data(), rows, K, N); break;
    case at::kBFloat16: float_linear_typed(x_float.data(), xb, weight.data_ptr<c10::BFloat16>(), out_float.data(), rows, K, N); break;
    case at::kHalf: float_linear_typed(x_float.data(), xb, weight.data_ptr<c10::Half>(), out_float.data(), rows, K, N); break;
    default: TORCH_CHECK(false, "weight must be float32, bfloat16 or float16");
  }
  if (bias.has_value() && bias->defined()) {
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    const float* bp = b.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < N; ++n) out_float[r * N + n] += bp[n];
  }
  at::Tensor out = at::empty({rows, N}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(out.data_ptr<float>(), out_float.data(), rows * N * sizeof(float)); break;
    case at::kBFloat16: from_float(out_float.data(), out.data_ptr<c10::BFloat16>(), rows * N); break;
    default: from_float(out_float.data(), out.data_ptr<c10::Half>(), rows * N); break;
  }
  return out;
}

// ---------------------------------------------------------------- attention of a few query rows
// One decoded token (or a verification of a few drafted ones) attends over the KV cache: per query row and
// head, scores against every cached key the mask lets through, a softmax, and the weighted sum of the values.
// Masked positions are skipped, not read: a causal decode at position p reads p + 1 cached rows, whatever the
// cache's length. Accumulated in float32; the softmax's exp is vectorized (a fitted polynomial of 2^f).

// One float32 vector of the widest kind the CPU has, for the attention loops below.
#if defined(__AVX512F__)
using Floats = __m512;
constexpr int64_t LANES = 16;
inline Floats floats_zero() { return _mm512_setzero_ps(); }
inline Floats floats_set(float x) { return _mm512_set1_ps(x); }
inline Floats floats_load(const float* p) { return _mm512_loadu_ps(p); }
template <typename T>
inline Floats floats_widen(const T* p) { return load_float16(p); }
inline Floats floats_fma(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline void floats_store(float* p, Floats v) { _mm512_storeu_ps(p, v); }
inline float floats_sum(Floats v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
using Floats = __m256;
constexpr int64_t LANES = 8;
inline Floats floats_zero() { return _mm256_setzero_ps(); }
inline Floats floats_set(float x) { return _mm256_set1_ps(x); }
inline Floats floats_load(const float* p) { return _mm256_loadu_ps(p); }
template <typename T>
inline Floats floats_widen(const T* p) { return load_float8(p); }
inline Floats floats_fma(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
inline void floats_store(float* p, Floats v) { _mm256_storeu_ps(p, v); }
inline float floats_sum(Floats v) { return horizontal_sum(v); }
#endif

// sum over d of q[d] * row[d], q in float32, row in the cache's dtype
template <typename KV>
inline float dot_row(const float* q, const KV* row, int64_t D) {
  int64_t d = 0;
  float total = 0.f;
#if defined(__AVX2__)
  Floats acc = floats_zero();
  for (; d + LANES <= D; d += LANES) acc = floats_fma(floats_load(q + d), floats_widen(row + d), acc);
  total = floats_sum(acc);
#endif
  for (; d < D; ++d) total += q[d] * static_cast<float>(row[d]);
  return total;
}

// out[0, D) = sum over the attended positions l of p[l] * rows[l]: VECTORS (D / LANES) accumulators held in
// registers across positions where the head size is a known multiple of the vector (0: any D, through memory).
template <int VECTORS, typename KV>
void weighted_rows(float* out, const float* p, const KV* rows, const bool* mask, int64_t first, int64_t last,
                   int64_t D) {
#if defined(__AVX2__)
  if constexpr (VECTORS > 0) {
    Floats acc[VECTORS];
    for (int j = 0; j < VECTORS; ++j) acc[j] = floats_zero();
    for (int64_t l = first; l < last; ++l) {
      if (!mask[l]) continue;
      const Floats weight = floats_set(p[l]);
      for (int j = 0; j < VECTORS; ++j) acc[j] = floats_fma(weight, floats_widen(rows + l * D + LANES * j), acc[j]);
    }
    for (int j = 0; j < VECTORS; ++j) floats_store(out + LANES * j, acc[j]);
    return;
  }
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t l = first; l < last; ++l) {
    if (!mask[l]) continue;
    int64_t d = 0;
#if defined(__AVX2__)
    const Floats weight = floats_set(p[l]);
    for (; d + LANES <= D; d += LANES)
      floats_store(out + d, floats_fma(weight, floats_widen(rows + l * D + d), floats_load(out + d)));
#endif
    for (; d < D; ++d) out[d] += p[l] * static_cast<float>(rows[l * D + d]);
  }
}

// scores[l] = exp(scores[l] - top) in place; returns their sum (masked entries hold -inf and become ~0)
inline float exp_and_sum(float* scores, int64_t L, float top) {
  int64_t l = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; l + 16 <= L; l += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + l), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + l, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#elif defined(__AVX2__)
  __m256 sum = _mm256_setzero_ps();
  for (; l + 8 <= L; l += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + l), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + l, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = horizontal_sum(sum);
#endif
  for (; l < L; ++l) {
    scores[l] = std::exp(scores[l] - top);
    total += scores[l];
  }
  return total;
}

inline bool zero_bytes(const bool* p) {  // 8 mask entries all false
  uint64_t bits;
  std::memcpy(&bits, p, 8);
  return bits == 0;
}

template <typename KV>
using WeightedRows = void (*)(float*, const float*, const KV*, const bool*, int64_t, int64_t, int64_t);

template <typename KV>
WeightedRows<KV> weighted_rows_for(int64_t D) {  // the common head sizes with their accumulators in registers
#if defined(__AVX2__)
  if (D == 2 * LANES) return weighted_rows<2, KV>;
  if (D == 4 * LANES) return weighted_rows<4, KV>;
  if (D == 8 * LANES) return weighted_rows<8, KV>;
#endif
  return weighted_rows<0, KV>;
}

// One KV head's cache as attend_row reads it: rows k, v [L, D] of the activations' dtype, or of int8 with a
// float32 scale per row (model.py's quantized KVCache: entry * scale), which the loops apply per position:
// the int8 entries are read as they are, never dequantized into a copy of the cache.
template <typename KV>
struct CacheHead {
  const KV *k, *v;
  const float *k_scale = nullptr, *v_scale = nullptr;  // [L] each, int8 caches only
  CacheHead at(int64_t offset, int64_t rows) const {  // the head `offset / D` rows in (scales: `rows` in)
    return {k + offset, v + offset, k_scale ? k_scale + rows : nullptr, v_scale ? v_scale + rows : nullptr};
  }
};

// [first, last): the positions from the first to the last one that mask [L] lets through (a causal decode's
// prefix, a sliding window), found 8 mask bytes at a time; holes inside (a Medusa tree's) are skipped later.
inline std::pair<int64_t, int64_t> attended_range(const bool* mask, int64_t L) {
  int64_t first = 0, last = L;
  while (first + 8 <= last && zero_bytes(mask + first)) first += 8;
  while (first < last && !mask[first]) ++first;
  while (last - 8 >= first && zero_bytes(mask + last - 8)) last -= 8;
  while (last > first && !mask[last - 1]) --last;
  return {first, last};
}

// One query row q [D] of one head against its KV head's cached rows [begin, end) where mask lets it through,
// the softmax not yet normalized: acc [D] = sum of exp(score - top) * value row; returns top (-inf where
// nothing is attended) and sets *sum to the sum of the exps. Parts over split positions merge (merge_parts).
template <typename T, typename KV>
float attend_part(const T* q, const CacheHead<KV>& cache, const bool* mask, int64_t begin, int64_t end, int64_t D,
                  WeightedRows<KV> weighted, float* acc, float* sum) {
  const KV *k = cache.k, *v = cache.v;
  thread_local std::vector<float> scores, query;
  scores.resize(std::max<int64_t>(end, 1));
  query.resize(D);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t d = 0; d < D; ++d) query[d] = static_cast<float>(q[d]) * scale;
  float top = -INFINITY;
  for (int64_t l = begin; l < end; ++l) {
    scores[l] = mask[l] ? dot_row(query.data(), k + l * D, D) * (cache.k_scale ? cache.k_scale[l] : 1.f) : -INFINITY;
    top = std::max(top, scores[l]);
  }
  if (top == -INFINITY) {  // nothing attended here
    std::fill(acc, acc + D, 0.f);
    *sum = 0.f;
    return top;
  }
  *sum = exp_and_sum(scores.data() + begin, end - begin, top);
  if (cache.v_scale)  // each value row's scale folded into its weight, after the softmax's sum
    for (int64_t l = begin; l < end; ++l) scores[l] *= cache.v_scale[l];
  weighted(acc, scores.data(), v, mask, begin, end, D);
  return top;
}

// One query row q [D] of one head against its KV head's cached rows where mask [L] lets it through.
template <typename T, typename KV>
void attend_row(const T* q, const CacheHead<KV>& cache, const bool* mask, int64_t L, int64_t D,
                WeightedRows<KV> weighted, T* out) {
  thread_local std::vector<float> acc;
  acc.resize(D);
  const auto [first, last] = attended_range(mask, L);
  float sum = 0.f;
  attend_part(q, cache, mask, first, last, D, weighted, acc.data(), &sum);
  const float inverse = sum > 0.f ? 1.f / sum : 0.f;  // a row that attends to nothing: zeros
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inverse);
}

// The softmax of parts (attend_part's top, sum and acc [D] each) of one row, over all of them, rounded to T.
template <typename T>
void merge_parts(const float* tops, const float* sums, const float* accs, int64_t parts, int64_t stride,
                 int64_t D, T* out) {
  float top = -INFINITY;
  for (int64_t p = 0; p < parts; ++p) top = std::max(top, tops[p * stride]);
  thread_local std::vector<float> merged;
  merged.assign(D, 0.f);
  float total = 0.f;
  for (int64_t p = 0; p < parts; ++p) {
    if (tops[p * stride] == -INFINITY) continue;
    const float weight = std::exp(tops[p * stride] - top);
    total += weight * sums[p * stride];
    for (int64_t d = 0; d < D; ++d) merged[d] += weight * accs[p * stride * D + d];
  }
  const float inverse = total > 0.f ? 1.f / total : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(merged[d] * inverse);
}

template <typename KV>
CacheHead<KV> cache_of(const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& k_scales,
                       const c10::optional<at::Tensor>& v_scales) {
  return {k.data_ptr<KV>(), v.data_ptr<KV>(), k_scales ? k_scales->data_ptr<float>() : nullptr,
          v_scales ? v_scales->data_ptr<float>() : nullptr};
}

// k and v [B, KVH, L, D] contiguous, of q's dtype, or int8 with float32 scales [B, KVH, L, 1] contiguous
void check_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(k_scales.has_value() == v_scales.has_value(), "give both k_scales and v_scales, or neither");
  if (!k_scales) {
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k and v must have one dtype (or k and v int8 with their scales)");
    return;
  }
  TORCH_CHECK(k.scalar_type() == at::kChar && v.scalar_type() == at::kChar, "k and v with scales must be int8");
  for (const at::Tensor* scales : {&*k_scales, &*v_scales})
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == k.numel() / k.size(3),
                "k_scales and v_scales must be float32 [B, KVH, L, 1], contiguous");
}

template <typename T, typename KV>
void attention_typed(const at::Tensor& q, const CacheHead<KV>& cache, int64_t KVH, int64_t L, const at::Tensor& mask,
                     at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t group = H / KVH;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), mr = mask.size(2) == 1 ? 0 : mask.stride(2);
  const WeightedRows<KV> weighted = weighted_rows_for<KV>(D);
  at::parallel_for(0, B * H * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * R), h = i / R % H, r = i % R;
      const int64_t head = b * KVH + h / group;  // q [B, H, R, D] contiguous: row i
      attend_row(qp + i * D, cache.at(head * L * D, head * L), mp + b * mb + r * mr, L, D, weighted, op + i * D);
    }
  });
}

template <typename T>
void attention_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales,
                     const at::Tensor& mask, at::Tensor& out) {
  if (k_scales)
    attention_typed<T, int8_t>(q, cache_of<int8_t>(k, v, k_scales, v_scales), k.size(1), k.size(2), mask, out);
  else
    attention_typed<T, T>(q, cache_of<T>(k, v, k_scales, v_scales), k.size(1), k.size(2), mask, out);
}

// softmax(q k^T / sqrt(D) where mask) v for q [B, H, R, D], k and v [B, KVH, L, D] (H a multiple of KVH: each
// KV head serves H / KVH query heads), mask bool [1 or B, 1, 1 or R, L]; out [B, H, R, D] in q's dtype. With
// k_scales and v_scales [B, KVH, L, 1] (float32), k and v are an int8 cache: entries times their row's scale.
at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& mask_in,
                     const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(), "q [B, H, R, D], k and v [B, KVH, L, D]");
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && k_in.size(3) == q_in.size(3) && q_in.size(1) % k_in.size(1) == 0,
              "k and v must match q's batch and head size, and their heads divide q's");
  TORCH_CHECK(mask_in.dim() == 4 && mask_in.size(3) == k_in.size(2) && mask_in.size(1) == 1
              && (mask_in.size(0) == 1 || mask_in.size(0) == q_in.size(0))
              && (mask_in.size(2) == 1 || mask_in.size(2) == q_in.size(2)), "mask must be [1 or B, 1, 1 or R, L]");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  check_cache(q, k, v, k_scales, v_scales);
  at::Tensor mask = mask_in.scalar_type() == at::kBool ? mask_in : mask_in.to(at::kBool);
  if (mask.stride(3) != 1) mask = mask.contiguous();
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: attention_cache<float>(q, k, v, k_scales, v_scales, mask, out); break;
    case at::kBFloat16: attention_cache<c10::BFloat16>(q, k, v, k_scales, v_scales, mask, out); break;
    case at::kHalf: attention_cache<c10::Half>(q, k, v, k_scales, v_scales, mask, out); break;
    default: TORCH_CHECK(false, "q, k and v must be float32, bfloat16 or float16");
  }
  return out;
}

// ---------------------------------------------------------------- a decoder block of one token in one call
// A decoded token's block is ~8 calls in the compiled graph (norm, qkv, rope and cache write, attention, wo,
// residual and norm, gate and up, down), each a trip through the dispatcher and an OpenMP fork and join: about
// 2 ms of a 6 ms int4 token on 2 cores is that fixed cost (measured with the products' loops emptied).
// decoder_block does the same work, the cache write included, in one call and one parallel region, the threads
// meeting at barriers. Every value the module path stores in the model's dtype T is rounded to T here too, so
// the two paths agree to the last bit or nearly (the tests compare them).

struct Weights {  // one linear layer in its native kernel's layout
  int64_t kind = 0;  // 0: a float weight [N, K]; 1: int8 tiles and their scales; 2: int4 tiles, d and m
  const void *a = nullptr, *b = nullptr, *c = nullptr;
  at::ScalarType dtype = at::kFloat;  // a float weight's
  int64_t K = 0, N = 0, shift = 0;
  int64_t tiles() const { return (N + TILE - 1) / TILE; }
};

// A block's weights as one region (a uint8 tensor: the model's weights placed together, memory.py) and a
// layout [PIECES, 3]: each piece's byte offset in the region (-1: absent), dtype code and element count, in
// BLOCK_PIECES' order. One tensor for every weight of every block: the compiled step passes 1 input where it
// passed 17 a block (dynamo fetching each, the wrapper converting each: ~0.7 us a tensor a token).
enum PieceCode : int64_t { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, U8 = 4 };
// attention norm, ffn norm, qkv bias, q norm, k norm, then a, b, c of qkv, wo, w1, w3 and w2
constexpr int64_t PIECES = 20;
struct Piece {
  const void* p = nullptr;
  int64_t code = -1, numel = 0;
};

std::array<Piece, PIECES> pieces_of(const at::Tensor& region, const at::Tensor& layout) {
  TORCH_CHECK(region.scalar_type() == at::kByte && region.dim() == 1 && region.is_contiguous(),
              "weights must be a contiguous 1-D uint8 region");
  TORCH_CHECK(layout.scalar_type() == at::kLong && layout.is_contiguous() && layout.numel() == PIECES * 3,
              "layout must be int64 [20, 3] (offset, dtype code, numel)");
  static const int64_t sizes[] = {4, 2, 2, 1, 1};
  const int64_t* l = layout.data_ptr<int64_t>();
  const uint8_t* base = region.data_ptr<uint8_t>();
  std::array<Piece, PIECES> pieces;
  for (int64_t i = 0; i < PIECES; ++i) {
    const int64_t offset = l[3 * i], code = l[3 * i + 1], numel = l[3 * i + 2];
    if (offset < 0) continue;
    TORCH_CHECK(code >= 0 && code <= U8 && numel >= 0, "layout: unknown dtype code");
    TORCH_CHECK(offset % sizes[code] == 0 && offset + numel * sizes[code] <= region.numel(),
                "layout: a piece lies outside the region or is misaligned");
    pieces[i] = {base + offset, code, numel};
  }
  return pieces;
}

// A linear layer from its pieces a, b, c (kind 0: a float weight [N, K]; 1: int8 tiles and scales; 2: int4
// tiles, d and m), checked as the separate kernels check their tensors.
Weights weights_from(const Piece* abc, int64_t kind, int64_t groupsize, int64_t K, int64_t N) {
  Weights w;
  const Piece &a = abc[0], &b = abc[1], &c = abc[2];
  TORCH_CHECK(a.p != nullptr, "layout: a layer's weights are missing");
  w.kind = kind, w.K = K, w.N = N, w.a = a.p, w.b = b.p, w.c = c.p;
  if (kind == 0) {
    TORCH_CHECK((a.code == F32 || a.code == BF16 || a.code == F16) && a.numel == N * K,
                "a float weight must be [N, K] float32, bfloat16 or float16");
    w.dtype = a.code == F32 ? at::kFloat : a.code == BF16 ? at::kBFloat16 : at::kHalf;
    return w;
  }
  TORCH_CHECK(kind == 1 || kind == 2, "kind must be 0 (float), 1 (int8) or 2 (int4)");
  TORCH_CHECK(K % BLOCK == 0, "K must be a multiple of 32");
  if (kind == 1) check_int8_pieces(a.code == I8, a.numel, b.code == F32, b.numel, K, groupsize, N);
  else check_int4_pieces(a.code == U8, a.numel, b.code == F16 && c.code == F16 && c.p, b.numel, c.numel, K, groupsize, N);
  w.shift = group_shift(K, groupsize);
  return w;
}

// A thread's copy of a call's input rows: as float, and quantized in blocks of 32 for the integer kernels.
struct RowInput {
  std::vector<float> x, scale, scaled_sum;
  std::vector<int8_t> q;
  std::vector<c10::BFloat16> xb;  // the rows as they were, when bfloat16 (float_product's pair path)
  int64_t rows = 0;
  template <typename T>
  void set(const T* input, int64_t input_rows, int64_t K, bool quantized) {
    rows = input_rows;
    x.resize(rows * K);
    for (int64_t i = 0; i < rows * K; ++i) x[i] = static_cast<float>(input[i]);
    if constexpr (std::is_same_v<T, c10::BFloat16>) xb.assign(input, input + rows * K);
    else xb.clear();
    if (!quantized) return;
    q.resize(rows * K), scale.resize(rows * K / BLOCK), scaled_sum.resize(rows * K / BLOCK);
    quantize_activations(x.data(), rows, K, q.data(), scale.data(), scaled_sum.data());
  }
};

// out[r, c] for every input row r and the channels c of tiles [t_begin, t_end) of w
void run_tiles(const Weights& w, const RowInput& in, float* out, int64_t t_begin, int64_t t_end) {
  const int64_t n_begin = t_begin * TILE, n_end = std::min(w.N, t_end * TILE);
  if (w.kind == 2) {
    DISPATCH_ROWS(in.rows, int4_tile_rows, static_cast<const uint8_t*>(w.a), static_cast<const c10::Half*>(w.b),
                  static_cast<const c10::Half*>(w.c), w.K, w.shift, in.q.data(), in.scale.data(),
                  in.scaled_sum.data(), out, w.N, t_begin, t_end)
  } else if (w.kind == 1) {
    DISPATCH_ROWS(in.rows, int8_tile_rows, static_cast<const int8_t*>(w.a), static_cast<const float*>(w.b), w.K,
                  w.shift, in.q.data(), in.scale.data(), in.scaled_sum.data(), out, w.N, t_begin, t_end)
  } else if (w.dtype == at::kFloat) {
    DISPATCH_ROWS(in.rows, float_rows, static_cast<const float*>(w.a), w.K, in.x.data(), out, w.N, n_begin, n_end)
  } else if (w.dtype == at::kBFloat16) {
    float_product(static_cast<const c10::BFloat16*>(w.a), w.K, in.x.data(), in.xb.empty() ? nullptr : in.xb.data(),
                  out, w.N, in.rows, n_begin, n_end);
  } else {
    DISPATCH_ROWS(in.rows, float_rows, static_cast<const c10::Half*>(w.a), w.K, in.x.data(), out, w.N, n_begin, n_end)
  }
}

inline std::pair<int64_t, int64_t> share_of(int64_t count, int thread, int threads) {  // a thread's part
  return {count * thread / threads, count * (thread + 1) / threads};
}

template <typename T>
inline float rounded(float x) { return static_cast<float>(static_cast<T>(x)); }

// RMSNorm as model.RMSNorm computes it: normalized in float32, rounded to T, times the weight (rounded to T).
template <typename T>
void rms_norm(const float* x, const T* weight, double eps, int64_t n, T* out) {
  float squares = 0.f;
  for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(squares / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(weight[i]) * rounded<T>(x[i] * inverse));
}

// One decoder block's inputs, resolved once per call: pointers in the activations' dtype T; the cache's
// entries are T, or int8 with a float32 scale per head and position.
template <typename T>
struct BlockInputs {
  const T *h, *attention_norm, *ffn_norm, *bias, *q_norm, *k_norm, *cos, *sin;
  const float* bias_f32;  // qkv's bias when float32 (a quantized layer's): rounded to T as the module path does
  double eps, ffn_eps, qk_eps;
  Weights qkv, wo, w1, w3, w2;
  int64_t R, dim, heads, kv_heads, D, L, mask_rows;
  void *k, *v;  // the cache's first sequence [KVH, L, D]
  float *k_scales, *v_scales;  // [KVH, L] (int8 cache only)
  const int64_t* positions;  // [R]: where each row's k and v are written
  const bool* mask;  // [mask_rows, L]
};

// A head's D values as the cache holds them: T, or int8 with its scale as model.quantize_kv rounds them
// (the largest magnitude / 127, values / scale rounded half to even).
template <typename T>
inline void store_head(const T* values, int64_t D, T* entries, float*) { std::copy(values, values + D, entries); }
template <typename T>
inline void store_head(const T* values, int64_t D, int8_t* entries, float* scale) {
  float top = 0.f;
  for (int64_t d = 0; d < D; ++d) top = std::max(top, std::abs(static_cast<float>(values[d])));
  const float s = std::max(top, 1e-12f) / 127.f;
  for (int64_t d = 0; d < D; ++d)
    entries[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(values[d]) / s))));
  *scale = s;
}

// The whole block for its R rows in one parallel region: the attention norm and qkv; each head's bias,
// q/k norm (Qwen3) and rope, k and v written to the cache; attention over the cache where each row's mask
// allows; wo and the residual; the norm; silu(w1 x) * (w3 x); w2 and the residual. The threads meet at a
// barrier between phases; each product's channels are split into one contiguous share per thread (measured:
// handing out smaller chunks to whichever thread is free streams the weights 25-40% slower).
template <typename T, typename KV>
at::Tensor decoder_block_typed(const BlockInputs<T>& b) {
  KV *k_cache = static_cast<KV*>(b.k), *v_cache = static_cast<KV*>(b.v);
  const int64_t R = b.R, dim = b.dim, H = b.heads, KVH = b.kv_heads, D = b.D, L = b.L, N = b.qkv.N;
  const int64_t inter = b.w1.N, group = H / KVH;
  const WeightedRows<KV> weighted = weighted_rows_for<KV>(D);
  thread_local std::vector<float> qkv_out, wo_out, gate, up;
  thread_local std::vector<T> queries, activated, residual;  // shared by the threads, each writing its part
  thread_local std::vector<float> tops, sums, accs;  // attention's softmax parts [threads, R * H] (accs: x D)
  const int64_t team = at::get_num_threads();
  tops.resize(team * R * H), sums.resize(team * R * H), accs.resize(team * R * H * D);
  float *part_top = tops.data(), *part_sum = sums.data(), *part_acc = accs.data();
  qkv_out.resize(R * N), wo_out.resize(R * dim), gate.resize(R * inter), up.resize(R * inter);
  queries.resize(R * H * D), activated.resize(R * inter), residual.resize(R * dim);
  float *qkv_p = qkv_out.data(), *wo_p = wo_out.data(), *gate_p = gate.data(), *up_p = up.data();
  T *q_p = queries.data(), *act = activated.data(), *h2 = residual.data();
  at::Tensor result = at::empty({R, dim}, c10::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* y = result.data_ptr<T>();
#pragma omp parallel num_threads(team)
  {
    const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
    thread_local RowInput in;
    thread_local std::vector<T> attended;  // wo's input, merged by each thread
    attended.resize(R * H * D);
    thread_local std::vector<float> rows_float, head;
    thread_local std::vector<T> normed, head_values;
    rows_float.resize(R * dim), normed.resize(R * dim), head.resize(D), head_values.resize(D);
    // every thread: the rows normed, as its input (the norm of R x dim values costs less than a barrier)
    for (int64_t i = 0; i < R * dim; ++i) rows_float[i] = static_cast<float>(b.h[i]);
    for (int64_t r = 0; r < R; ++r) rms_norm(rows_float.data() + r * dim, b.attention_norm, b.eps, dim, normed.data() + r * dim);
    in.set(normed.data(), R, dim, b.qkv.kind != 0);
    // The cache lines this thread's k and v heads will be written to (after qkv), fetched meanwhile: a line not
    // in cache costs a read from memory before the write (int4 SmolLM2, the slower thread: 3.7 -> 1 us a block).
    const int64_t items = R * (H + 2 * KVH), entry_bytes = D * static_cast<int64_t>(sizeof(KV));
    for (int64_t i = thread; i < items; i += threads) {
      const int64_t r = i / (H + 2 * KVH), hd = i % (H + 2 * KVH);
      if (hd < H) continue;
      const bool is_k = hd < H + KVH;
      const int64_t slot = (is_k ? hd - H : hd - H - KVH) * L + b.positions[r];
      const char* entry = reinterpret_cast<const char*>((is_k ? k_cache : v_cache) + slot * D);
      for (int64_t byte = 0; byte < entry_bytes; byte += 64) __builtin_prefetch(entry + byte, 1, 3);
    }
    const auto [t_begin, t_end] = share_of(b.qkv.tiles(), thread, threads);
    run_tiles(b.qkv, in, qkv_p, t_begin, t_end);
#pragma omp barrier
    // (row, head) pairs over q's, k's and v's heads: in T (+ bias), q and k normed (Qwen3) and rotated, q kept
    // for attention ([H, R, D], as attention takes it), k and v written to the cache at the row's position
    for (int64_t i = thread; i < items; i += threads) {  // every other one: q's heads, and k's and v's, split evenly
      const int64_t r = i / (H + 2 * KVH), hd = i % (H + 2 * KVH);
      const float* out = qkv_p + r * N + hd * D;
      T* values = head_values.data();
      for (int64_t d = 0; d < D; ++d)
        values[d] = static_cast<T>(b.bias ? rounded<T>(out[d]) + static_cast<float>(b.bias[hd * D + d])
                                   : b.bias_f32 ? rounded<T>(out[d]) + rounded<T>(b.bias_f32[hd * D + d]) : out[d]);
      if (hd < H + KVH) {
        const T* head_norm = hd < H ? b.q_norm : b.k_norm;
        if (head_norm) {
          for (int64_t d = 0; d < D; ++d) head[d] = static_cast<float>(values[d]);
          rms_norm(head.data(), head_norm, b.qk_eps, D, values);
        }
        for (int64_t d = 0; d < D; ++d) head[d] = static_cast<float>(values[d]);
        const T *cp = b.cos + r * D, *sp = b.sin + r * D;
        const int64_t half = D / 2;  // HF's rotate_half: x cos + (-x2, x1) sin
        for (int64_t d = 0; d < D; ++d) {
          const float rotated = d < half ? -head[d + half] : head[d - half];
          values[d] = static_cast<T>(head[d] * static_cast<float>(cp[d]) + rotated * static_cast<float>(sp[d]));
        }
      }
      if (hd < H) {
        std::copy(values, values + D, q_p + (hd * R + r) * D);
        continue;
      }
      const bool is_k = hd < H + KVH;
      const int64_t kv_head = is_k ? hd - H : hd - H - KVH, slot = kv_head * L + b.positions[r];
      float* scales = is_k ? b.k_scales : b.v_scales;
      store_head(values, D, (is_k ? k_cache : v_cache) + slot * D, scales ? scales + slot : nullptr);
    }
#pragma omp barrier
    // Every (head, row) over this thread's share of the row's attended positions (shares of the heads would
    // leave one thread a head more: 5 of SmolLM2's 9 against 4), as softmax parts that each thread then merges
    // for all heads into its own copy of wo's input [R, H * D].
    const CacheHead<KV> cache{k_cache, v_cache, b.k_scales, b.v_scales};
    for (int64_t i = 0; i < H * R; ++i) {
      const int64_t hd = i / R, r = i % R, kv_head = hd / group;
      const bool* row_mask = b.mask + (b.mask_rows == 1 ? 0 : r * L);
      const auto [first, last] = attended_range(row_mask, L);
      const auto [begin, end] = share_of(last - first, thread, threads);
      const int64_t slot = thread * H * R + r * H + hd;
      part_top[slot] = attend_part(q_p + i * D, cache.at(kv_head * L * D, kv_head * L), row_mask, first + begin,
                                   first + end, D, weighted, part_acc + slot * D, part_sum + slot);
    }
#pragma omp barrier
    for (int64_t i = 0; i < R * H; ++i)
      merge_parts(part_top + i, part_sum + i, part_acc + i * D, threads, H * R, D, attended.data() + i * D);
    in.set(attended.data(), R, H * D, b.wo.kind != 0);
    const auto [o_begin, o_end] = share_of(b.wo.tiles(), thread, threads);
    run_tiles(b.wo, in, wo_p, o_begin, o_end);
#pragma omp barrier
    for (int64_t i = 0; i < R * dim; ++i)  // every thread: the residual and its norm, for its input
      rows_float[i] = rounded<T>(static_cast<float>(b.h[i]) + rounded<T>(wo_p[i]));
    if (thread == 0)
      for (int64_t i = 0; i < R * dim; ++i) h2[i] = static_cast<T>(rows_float[i]);
    for (int64_t r = 0; r < R; ++r) rms_norm(rows_float.data() + r * dim, b.ffn_norm, b.ffn_eps, dim, normed.data() + r * dim);
    in.set(normed.data(), R, dim, b.w1.kind != 0);
    const auto [g_begin, g_end] = share_of(b.w1.tiles(), thread, threads);
    run_tiles(b.w1, in, gate_p, g_begin, g_end);
    run_tiles(b.w3, in, up_p, g_begin, g_end);
    const int64_t c0 = std::min(inter, g_begin * TILE), count = std::min(inter, g_end * TILE) - c0;
    for (int64_t r = 0; r < R; ++r)
      silu_times(gate_p + r * inter + c0, up_p + r * inter + c0, act + r * inter + c0, count);
#pragma omp barrier
    in.set(act, R, inter, b.w2.kind != 0);
    const auto [d_begin, d_end] = share_of(b.w2.tiles(), thread, threads);
    float* w2_p = wo_p;  // wo's output is used up: every thread read it before the last barrier
    run_tiles(b.w2, in, w2_p, d_begin, d_end);
    const int64_t n0 = std::min(dim, d_begin * TILE), n1 = std::min(dim, d_end * TILE);
    for (int64_t r = 0; r < R; ++r)  // the residual of this thread's channels (h2 was written before a barrier)
      for (int64_t n = r * dim + n0; n < r * dim + n1; ++n)
        y[n] = static_cast<T>(static_cast<float>(h2[n]) + rounded<T>(w2_p[n]));
  }
  return result;
}


// t itself where it already is (no dispatcher trip: a block's inputs usually are), else a contiguous copy
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

template <typename T>
const T* piece_or_null(const Piece& piece, int64_t numel) {
  if (!piece.p) return nullptr;
  constexpr int64_t code = std::is_same_v<T, float> ? F32 : std::is_same_v<T, c10::BFloat16> ? BF16 : F16;
  TORCH_CHECK(piece.code == code && piece.numel == numel, "norm weights and bias must be in the activations' dtype");
  return static_cast<const T*>(piece.p);
}

template <typename T>
at::Tensor decoder_block_dtype(BlockInputs<T>& b, const std::array<Piece, PIECES>& pieces, const at::Tensor& cos,
                               const at::Tensor& sin, bool int8_cache) {
  const at::Tensor cos_t = contiguous_as(cos, c10::CppTypeToScalarType<T>::value);
  const at::Tensor sin_t = contiguous_as(sin, c10::CppTypeToScalarType<T>::value);
  b.attention_norm = piece_or_null<T>(pieces[0], b.dim), b.ffn_norm = piece_or_null<T>(pieces[1], b.dim);
  TORCH_CHECK(b.attention_norm && b.ffn_norm, "layout: the norms' weights are missing");
  const Piece& bias = pieces[2];
  b.bias_f32 = bias.p && bias.code == F32 && !std::is_same_v<T, float> ? static_cast<const float*>(bias.p) : nullptr;
  b.bias = b.bias_f32 ? nullptr : piece_or_null<T>(bias, b.qkv.N);
  TORCH_CHECK(!b.bias_f32 || bias.numel == b.qkv.N, "the bias must have qkv's out_features");
  b.q_norm = piece_or_null<T>(pieces[3], b.D), b.k_norm = piece_or_null<T>(pieces[4], b.D);
  b.cos = cos_t.data_ptr<T>(), b.sin = sin_t.data_ptr<T>();
  return int8_cache ? decoder_block_typed<T, int8_t>(b) : decoder_block_typed<T, T>(b);
}

// A decoder block for the rows h [R, dim] (R <= 8) of a batch of one at cache positions [R]: see
// decoder_block_typed. Its weights are pieces of `weights` as `layout` places them (pieces_of); kinds: each
// linear's (kind, groupsize), qkv, wo, w1 (and w3), w2. k and v [B, KVH, L, D] are the cache (its first
// sequence is used and written), of h's dtype, or int8 with float32 scales [B, KVH, L, 1]; mask [.., R or 1, L];
// cos and sin [R, head_dim].
at::Tensor decoder_block(const at::Tensor& h_in, const at::Tensor& weights, const at::Tensor& layout,
                         at::IntArrayRef kinds, double eps, double ffn_eps, double qk_eps, int64_t heads,
                         int64_t kv_heads, int64_t qkv_out, int64_t intermediate, const at::Tensor& cos,
                         const at::Tensor& sin, at::Tensor& k, at::Tensor& v, const at::Tensor& positions_in,
                         const at::Tensor& mask_in, const c10::optional<at::Tensor>& k_scales,
                         const c10::optional<at::Tensor>& v_scales) {
  const at::Tensor h = contiguous_as(h_in, h_in.scalar_type()), mask = contiguous_as(mask_in, at::kBool);
  const at::Tensor positions = contiguous_as(positions_in, at::kLong);
  const int64_t R = h.dim() == 2 ? h.size(0) : 0, D = qkv_out / (heads + 2 * kv_heads);
  TORCH_CHECK(R >= 1 && R <= MAX_ROWS, "decoder_block takes h [rows <= 8, dim]");
  TORCH_CHECK(kinds.size() == 8, "kinds: (kind, groupsize) of qkv, wo, w1 and w3, w2");
  TORCH_CHECK(heads % kv_heads == 0 && D * (heads + 2 * kv_heads) == qkv_out && D % 2 == 0
              && cos.numel() == R * D && sin.numel() == R * D,
              "qkv's out_features must be (heads + 2 kv_heads) * head_dim, cos and sin [rows, head_dim]");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.is_contiguous() && v.is_contiguous() && k.size(1) == kv_heads
              && k.size(3) == D, "k and v caches [B, kv_heads, L, head_dim], contiguous");
  TORCH_CHECK(positions.numel() == R, "one cache position per row");
  check_cache(h, k, v, k_scales, v_scales);
  const int64_t L = k.size(2), dim = h.size(1);
  TORCH_CHECK(mask.numel() == L || mask.numel() == R * L, "mask must be [.., rows or 1, L]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(pos[r] >= 0 && pos[r] < L, "cache position out of range");
  const std::array<Piece, PIECES> pieces = pieces_of(weights, layout);
  const Weights qkv = weights_from(&pieces[5], kinds[0], kinds[1], dim, qkv_out);
  const Weights wo = weights_from(&pieces[8], kinds[2], kinds[3], heads * D, dim);
  const Weights w1 = weights_from(&pieces[11], kinds[4], kinds[5], dim, intermediate);
  const Weights w3 = weights_from(&pieces[14], kinds[4], kinds[5], dim, intermediate);
  const Weights w2 = weights_from(&pieces[17], kinds[6], kinds[7], intermediate, dim);
  const bool int8_cache = k_scales.has_value();
  auto fill = [&](auto& b) {
    b.eps = eps, b.ffn_eps = ffn_eps, b.qk_eps = qk_eps;
    b.qkv = qkv, b.wo = wo, b.w1 = w1, b.w3 = w3, b.w2 = w2;
    b.R = R, b.dim = dim, b.heads = heads, b.kv_heads = kv_heads, b.D = D, b.L = L, b.mask_rows = mask.numel() / L;
    b.k = k.data_ptr(), b.v = v.data_ptr();
    b.k_scales = int8_cache ? k_scales->data_ptr<float>() : nullptr;
    b.v_scales = int8_cache ? v_scales->data_ptr<float>() : nullptr;
    b.positions = pos, b.mask = mask.data_ptr<bool>();
  };
  switch (h.scalar_type()) {
    case at::kFloat: {
      BlockInputs<float> b{};
      fill(b), b.h = h.data_ptr<float>();
      return decoder_block_dtype(b, pieces, cos, sin, int8_cache);
    }
    case at::kBFloat16: {
      BlockInputs<c10::BFloat16> b{};
      fill(b), b.h = h.data_ptr<c10::BFloat16>();
      return decoder_block_dtype(b, pieces, cos, sin, int8_cache);
    }
    case at::kHalf: {
      BlockInputs<c10::Half> b{};
      fill(b), b.h = h.data_ptr<c10::Half>();
      return decoder_block_dtype(b, pieces, cos, sin, int8_cache);
    }
    default: TORCH_CHECK(false, "h must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(gptfast_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor tiles, Tensor scales, int groupsize, int out_features) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor tiles, Tensor d, Tensor m, int groupsize, int out_features) -> Tensor");
  m.def("float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_weight_rows(Tensor tiles, Tensor scales, int groupsize, int K, int N, int n_begin, int n_end, ScalarType dtype) -> Tensor");
  m.def("int4_weight_rows(Tensor tiles, Tensor d, Tensor m, int groupsize, int K, int N, int n_begin, int n_end, ScalarType dtype) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
  m.def("float_gated_linear(Tensor x, Tensor gate_weight, Tensor up_weight) -> Tensor");
  m.def("int8_gated_linear(Tensor x, Tensor gate_tiles, Tensor gate_scales, Tensor up_tiles, Tensor up_scales, "
        "int groupsize, int out_features) -> Tensor");
  m.def("int4_gated_linear(Tensor x, Tensor gate_tiles, Tensor gate_d, Tensor gate_m, Tensor up_tiles, Tensor up_d, "
        "Tensor up_m, int groupsize, int out_features) -> Tensor");
  m.def("decoder_block(Tensor h, Tensor weights, Tensor layout, int[] kinds, float eps, float ffn_eps, float qk_eps, "
        "int heads, int kv_heads, int qkv_out, int intermediate, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, "
        "Tensor positions, Tensor mask, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("float_linear", &float_linear);
  m.impl("int8_weight_rows", &int8_weight_rows);
  m.impl("int4_weight_rows", &int4_weight_rows);
  m.impl("attention", &attention);
  m.impl("float_gated_linear", &float_gated_linear);
  m.impl("int8_gated_linear", &int8_gated_linear);
  m.impl("int4_gated_linear", &int4_gated_linear);
  m.impl("decoder_block", &decoder_block);
}
