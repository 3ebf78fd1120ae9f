// y = x W^T for decoding: x a few bf16 rows, W in int4 with a scale and an offset per group of inputs of each output
// (w = scale * q + offset, q in 0..15), multiplied with AVX512-BF16's vdpbf16ps.
//
// Layout (int4.Int4Bf16Weight.from_levels writes it):
//   packed  (N/16, K/8, 64) uint8: block b holds outputs 16b..16b+15, chunk c inputs 8c..8c+7. In each 128-bit lane
//           L (bytes 16L..16L+15) byte j is q[o, k] | q[o, k + 4] << 4 with o = 16b + 4L + (j % 8) / 2 and
//           k = 8c + 2 * (j / 8) + j % 2: so `unpacklo/hi_epi8` with the byte 0x43 turn a chunk's low (high)
//           nibbles into 16 outputs x one pair of inputs of bf16 numbers 128 + q, the pairs vdpbf16ps takes.
//   scales  (N/16, K/G, 16) float: the groups' scales;
//   offsets (N/16, K/G, 16) float: offset - 128 * scale, since the kernel multiplies by 128 + q.
// Each output's sum over a group is scale * sum(x * (128 + q)) + (offset - 128 * scale) * sum(x), every product
// exact in fp32 and the sums in fp32: the same for a row whatever the other rows are.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int kRowTile = 4;

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void block_rows(
    const uint8_t* packed, const float* scales, const float* offsets, const uint16_t* x, int64_t x_stride,
    const float* sums, int64_t groups, int64_t chunks_per_group, float* y, int64_t y_stride) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i exponent = _mm512_set1_epi8(0x43);
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < 4; ++p) acc[r][p] = _mm512_setzero_ps();
    for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
      const __m512i v = _mm512_loadu_si512(packed + c * 64);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      const __m512i w0 = _mm512_unpacklo_epi8(lo, exponent);
      const __m512i w1 = _mm512_unpackhi_epi8(lo, exponent);
      const __m512i w2 = _mm512_unpacklo_epi8(hi, exponent);
      const __m512i w3 = _mm512_unpackhi_epi8(hi, exponent);
      for (int r = 0; r < R; ++r) {
        // each pair of bf16 inputs read as one float and broadcast: the compiler folds it into vdpbf16ps's
        // memory operand ({1to16}), where a broadcast of an integer took an instruction of its own
        const float* xr = reinterpret_cast<const float*>(x + r * x_stride + c * 8);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)_mm512_set1_ps(xr[0]));
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w1, (__m512bh)_mm512_set1_ps(xr[1]));
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], (__m512bh)w2, (__m512bh)_mm512_set1_ps(xr[2]));
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], (__m512bh)w3, (__m512bh)_mm512_set1_ps(xr[3]));
      }
    }
    const __m512 s = _mm512_loadu_ps(scales + g * 16);
    const __m512 m = _mm512_loadu_ps(offsets + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
      out[r] = _mm512_fmadd_ps(d, s, _mm512_fmadd_ps(m, _mm512_set1_ps(sums[r * groups + g]), out[r]));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * y_stride, out[r]);
}

using BlockFn = void (*)(const uint8_t*, const float*, const float*, const uint16_t*, int64_t, const float*, int64_t,
                         int64_t, float*, int64_t);
constexpr BlockFn kBlock[kRowTile + 1] = {nullptr, block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>};

at::Tensor int4_bf16_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& offsets, int64_t group) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "int4_bf16_mm needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_bf16_mm: x must be 2-D bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte, "int4_bf16_mm: packed");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * 16;
  TORCH_CHECK(packed.size(1) * 8 == K, "int4_bf16_mm: x has ", K, " inputs, the weight ", packed.size(1) * 8);
  TORCH_CHECK(group % 8 == 0 && K % group == 0, "int4_bf16_mm: group ", group);
  const int64_t groups = K / group;
  TORCH_CHECK(scales.sizes() == offsets.sizes() && scales.size(0) == blocks && scales.size(1) == groups &&
                  scales.size(2) == 16 && scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat,
              "int4_bf16_mm: scales/offsets");
  auto xc = x.contiguous();
  auto pc = packed.contiguous(), sc = scales.contiguous(), oc = offsets.contiguous();
  // each row's sum over each group of the bf16 values the products use, in one order whatever the rows
  auto sums = at::empty({M, groups}, x.options().dtype(at::kFloat));
  const at::BFloat16* xv = xc.data_ptr<at::BFloat16>();
  float* sv = sums.data_ptr<float>();
  for (int64_t i = 0; i < M * groups; ++i) {
    float total = 0.f;
    for (int64_t j = 0; j < group; ++j) total += static_cast<float>(xv[i * group + j]);
    sv[i] = total;
  }
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* op = oc.data_ptr<float>();
  const float* up = sums.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = K / 8, chunks_per_group = group / 8;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r = 0; r < M; r += kRowTile) {
        const int R = static_cast<int>(std::min<int64_t>(kRowTile, M - r));
        kBlock[R](pp + b * chunks * 64, sp + b * groups * 16, op + b * groups * 16, xp + r * K, K, up + r * groups,
                  groups, chunks_per_group, yp + r * N + b * 16, N);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(blip2_native, m) {
  m.def("int4_bf16_mm(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_native, CPU, m) { m.impl("int4_bf16_mm", &int4_bf16_mm); }
