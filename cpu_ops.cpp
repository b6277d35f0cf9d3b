// Integer dot-product kernels for quantized decoding on x86 CPUs, the route llama.cpp takes:
// each activation row is quantized once per call to int8 in blocks of 32 (one float scale a block), then every
// output is a sum over blocks of (integer dot product of 32 int8 activations with 32 int8 or 4-bit weights)
// times the two blocks' scales. Integer multiply-adds (AVX2 maddubs, or VNNI dpbusd where the CPU has it) do
// 32 products per instruction without widening the weights to float, so the kernel stays memory-bound even on
// two cores. Several activation rows (a drafted verification) share each weight load: the weight row is read
// from memory once per call, whatever the number of rows.
//
// Built at first use by cpu_ops.py with -march=native for the CPU it runs on; cpu_ops.py times it against the
// other paths and keeps it only where it is faster. Plain C++ loops stand in where AVX2 is missing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 32;  // activation quantization block, and the unit of the integer dot product
constexpr int64_t MAX_ROWS = 4;  // activation rows kept in registers at once

// x [rows, K] float -> q int8 [rows, K], scale [rows, K/32], scaled_sum [rows, K/32] = scale * sum(q in block).
void quantize_activations(const float* x, int64_t rows, int64_t K, int8_t* q, float* scale, float* scaled_sum) {
  const int64_t blocks = K / BLOCK;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * K + b * BLOCK;
      int8_t* qb = q + r * K + b * BLOCK;
      float amax = 0.f;
      for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f;
      const float inverse = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xb[i] * inverse));
        qb[i] = static_cast<int8_t>(v);
        sum += v;
      }
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

// Eight int32 sums of 4 products each, of unsigned bytes u (0..255) and signed bytes s.
inline __m256i dot_unsigned_signed(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  // maddubs sums pairs into int16: 2 * 255 * 127 would overflow, but our operands stay within 2 * 127 * 127.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

// out[r, n] for rows r of one chunk (ROWS of them), for output channels [n_begin, n_end) of int8 weights.
// Weight scales: [N, K/groupsize]; per output channel is groupsize = K.
template <int ROWS>
void int8_rows(const int8_t* w, const float* w_scale, int64_t K, int64_t groupsize, const int8_t* xq,
               const float* x_scale, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t blocks = K / BLOCK, groups = K / groupsize, blocks_per_group = groupsize / BLOCK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* wn = w + n * K;
    const float* sn = w_scale + n * groups;
#if defined(__AVX2__)
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * BLOCK));
      const float ws = sn[b / blocks_per_group];
      for (int r = 0; r < ROWS; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * BLOCK));
        // |x| as unsigned times w with x's sign: the same products, in the operand order the instruction takes.
        const __m256i products = dot_unsigned_signed(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ws * x_scale[r * blocks + b]), _mm256_cvtepi32_ps(products), acc[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = horizontal_sum(acc[r]);
#else
    for (int r = 0; r < ROWS; ++r) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t i = 0; i < BLOCK; ++i) dot += int32_t(wn[b * BLOCK + i]) * int32_t(xq[r * K + b * BLOCK + i]);
        total += sn[b / blocks_per_group] * x_scale[r * blocks + b] * float(dot);
      }
      out[r * N + n] = total;
    }
#endif
  }
}

// 4-bit weights in llama.cpp's block order: 16 bytes a block of 32, element i in the low nibble of byte i and
// element 16 + i in its high nibble; value = d * q + m (q in 0..15), d and m float16 per group.
template <int ROWS>
void int4_rows(const uint8_t* w, const c10::Half* w_d, const c10::Half* w_m, int64_t K, int64_t groupsize,
               const int8_t* xq, const float* x_scale, const float* x_scaled_sum, float* out, int64_t N,
               int64_t n_begin, int64_t n_end) {
  const int64_t blocks = K / BLOCK, groups = K / groupsize, blocks_per_group = groupsize / BLOCK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wn = w + n * (K / 2);
    const c10::Half* dn = w_d + n * groups;
    const c10::Half* mn = w_m + n * groups;
    float offsets[ROWS] = {};  // sum over blocks of m * (scale * sum of the block's quantized activations)
#if defined(__AVX2__)
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; ++b) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + b * BLOCK / 2));
      const __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_nibbles);
      const int64_t g = b / blocks_per_group;
      const float d = static_cast<float>(dn[g]), m = static_cast<float>(mn[g]);
      for (int r = 0; r < ROWS; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * BLOCK));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x_scale[r * blocks + b]),
                                 _mm256_cvtepi32_ps(dot_unsigned_signed(wv, xv)), acc[r]);
        offsets[r] += m * x_scaled_sum[r * blocks + b];
      }
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = horizontal_sum(acc[r]) + offsets[r];
#else
    for (int r = 0; r < ROWS; ++r) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t i = 0; i < BLOCK / 2; ++i) {
          const uint8_t byte = wn[b * BLOCK / 2 + i];
          dot += int32_t(byte & 0xF) * xq[r * K + b * BLOCK + i] + int32_t(byte >> 4) * xq[r * K + b * BLOCK + 16 + i];
        }
        const int64_t g = b / blocks_per_group;
        total += static_cast<float>(dn[g]) * x_scale[r * blocks + b] * float(dot);
        offsets[r] += static_cast<float>(mn[g]) * x_scaled_sum[r * blocks + b];
      }
      out[r * N + n] = total + offsets[r];
    }
#endif
  }
}

// Runs `kernel<ROWS>` over row chunks of at most MAX_ROWS and output channels split between threads; each
// thread reads its weight rows once per chunk, and a chunk's activations stay in L1.
template <typename Launch>
at::Tensor run_chunks(const at::Tensor& x, int64_t N, const Launch& launch) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, K]");
  const int64_t rows = x.size(0), K = x.size(1);
  TORCH_CHECK(K % BLOCK == 0, "K must be a multiple of 32");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({rows, K}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({rows, K / BLOCK}, x.options().dtype(at::kFloat));
  at::Tensor x_scaled_sum = at::empty({rows, K / BLOCK}, x.options().dtype(at::kFloat));
  quantize_activations(xf.data_ptr<float>(), rows, K, xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(),
                       x_scaled_sum.data_ptr<float>());
  at::Tensor out = at::empty({rows, N}, x.options().dtype(at::kFloat));
  // Grain: at least 16 output channels a task, so a thread's share is long enough to hide the start-up.
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
      const int64_t chunk = std::min(MAX_ROWS, rows - r0);
      const int8_t* xq_chunk = xq.data_ptr<int8_t>() + r0 * K;
      const float* scale_chunk = x_scale.data_ptr<float>() + r0 * (K / BLOCK);
      const float* sum_chunk = x_scaled_sum.data_ptr<float>() + r0 * (K / BLOCK);
      float* out_chunk = out.data_ptr<float>() + r0 * N;
      launch(chunk, xq_chunk, scale_chunk, sum_chunk, out_chunk, n_begin, n_end);
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

#define DISPATCH_ROWS(chunk, KERNEL, ...)              \
  switch (chunk) {                                     \
    case 1: KERNEL<1>(__VA_ARGS__); break;             \
    case 2: KERNEL<2>(__VA_ARGS__); break;             \
    case 3: KERNEL<3>(__VA_ARGS__); break;             \
    default: KERNEL<4>(__VA_ARGS__); break;            \
  }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t groupsize) {
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "weight must be contiguous int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (K / groupsize),
              "scales must be contiguous float32 [N, K/groupsize]");
  TORCH_CHECK(groupsize % BLOCK == 0 && K % groupsize == 0, "groupsize must be a multiple of 32 dividing K");
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  return run_chunks(x, N, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float*, float* out,
                              int64_t n_begin, int64_t n_end) {
    DISPATCH_ROWS(chunk, int8_rows, w, s, K, groupsize, xq, x_scale, out, N, n_begin, n_end)
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m,
                       int64_t groupsize) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.is_contiguous() && m.is_contiguous()
              && d.numel() == N * (K / groupsize) && m.numel() == d.numel(), "d and m must be contiguous float16 [N, K/groupsize]");
  TORCH_CHECK(groupsize % BLOCK == 0 && K % groupsize == 0, "groupsize must be a multiple of 32 dividing K");
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const c10::Half* mp = m.data_ptr<c10::Half>();
  return run_chunks(x, N, [&](int64_t chunk, const int8_t* xq, const float* x_scale, const float* x_sum, float* out,
                              int64_t n_begin, int64_t n_end) {
    DISPATCH_ROWS(chunk, int4_rows, w, dp, mp, K, groupsize, xq, x_scale, x_sum, out, N, n_begin, n_end)
  });
}

}  // namespace

TORCH_LIBRARY(gptfast_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, int groupsize) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor d, Tensor m, int groupsize) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
