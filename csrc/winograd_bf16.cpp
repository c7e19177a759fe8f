// Winograd's F(2x2, 3x3) convolution (stride 1, padding 1) for bfloat16 channels_last images, its three steps in one
// op. A thread takes a chunk of tiles at a time into buffers of its own (dot: sized for its L2):
//   1. V = B^T d B of the chunk's tiles into v[16][tiles][C] (bf16, rounded once from fp32);
//   2. the 16 products M_k = V_k U_k with bf16 pairs multiplied and summed in fp32 (M fp32), by one of two engines:
//      - "amx": AMX tile multiplies (tdpbf16ps), 32x32 blocks, into m[16][tiles][O] for all the task's output
//        channels: product k outermost, then a 32-tile step of V_k (32 rows: held in L1 across the output
//        blocks), then the output blocks (U_k's: read once a chunk and k), so that a chunk of up to 256 tiles reads
//        U once where chunks of 32 read it 8 times;
//      - "dot": AVX512_BF16 dot products (vdpbf16ps), for CPUs without AMX (AMD Zen 4), per block of 32 output
//        channels into m[16][tiles][32]: each tile's channel pair broadcast against the 32 outputs' pairs (two
//        registers), 12 tiles at a time in 24 accumulators.
//      Both add the same products in fp32, in the same order;
//   3. Y = A^T M A, plus bias and residual in fp32, rounded once to bf16.
// Against the fp32 route (winograd.cpp's transforms around torch.bmm, whose bf16 products would come back rounded
// to bf16, with V and M streamed through memory) M stays fp32 and nothing leaves the chunk but the output.
//
// The filters come packed by the caller (cmfast/models/winograd.py) as the products' B operands:
// u[O / 32][16][C / 2][32][2]: per block of 32 output channels and product k, a row per pair of input channels,
// the 32 outputs' pairs in it (128 bytes: two 16-column tiles side by side, or two registers). C and O are
// multiples of 32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <c10/util/StringUtil.h>

#include "amx.h"
#include "common.h"
#include "cpu_features.h"
#include "ops.h"
#include "winograd_geometry.h"

// GCC 12's AVX-512 intrinsics pass an undefined register as the unused merge source of the zero-extension and shift
// in widen(); inlined into a loop it draws a false -Wmaybe-uninitialized (as in attention_loops.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Everything but the AMX products is compiled for AVX512_BF16 (a subset of the AMX functions' ISA, so it inlines
// into them as well).
#define CMFAST_ISA_BF16 "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"
#define CMFAST_BF16 __attribute__((target(CMFAST_ISA_BF16)))
#define CMFAST_BF16_INLINE __attribute__((target(CMFAST_ISA_BF16), always_inline)) inline
#define CMFAST_AMX __attribute__((target(CMFAST_ISA_BF16 ",amx-tile,amx-bf16")))

namespace cmfast {
namespace {

// 16 bf16 to fp32 (exact), and 16 fp32 to bf16 rounded to nearest even (NaN stays NaN).
CMFAST_BF16_INLINE __m512 widen(const uint16_t* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
CMFAST_BF16_INLINE void store_bf16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// Tiles a step (two A tiles of 16 rows), output channels a block (two B tiles of 16 columns) and input channels
// a step (a tile row: 32 bf16).
constexpr int64_t kStep = 32;
// dot: the chunk's transformed inputs in L2 (2 MB a core on Sapphire Rapids) while step 2 reads them once per block
// of output channels, beside a block's filters, the products and the chunk's outputs. Measured with the AMX
// products in that loop order (on 2 Sapphire Rapids cores, at LSUN-256's widths, 256-512 channels, 64x64 to
// 256x256): 512 KB at least as fast as 256 KB, 1 MB or 2 MB everywhere, by up to 10% at 512 -> 256 channels.
constexpr int64_t kChunkBytes = 512 << 10;
constexpr int64_t kMaxChunkTiles = 256;  // at few channels: m (16 x tiles x 32 fp32) stays at 512 KB
// amx: V and M of up to 256 tiles a chunk (L2 or L3; a core's L1 holds the 32-tile step of V_k it works on), within
// 16 MB a thread. Against 32-tile chunks in the loop order of dot, on 2 Sapphire Rapids cores: 1x512x256x256 -> 256
// channels 53 -> 42 ms, 1x512x128x128 -> 512 22 -> 16, 1x768x128x128 -> 256 17 -> 13, 4x384x64x64 11.3 -> 9.6; 96,
// 128 and 512-tile chunks were slower or equal.
constexpr int64_t kAmxChunkBytes = 16 << 20;
constexpr int64_t kAmxMaxChunkTiles = 256;

struct Conv {
  Geometry g;
  int64_t channels, out_channels;
  int64_t rows_step;  // the engine's rows a step: the products run over the chunk's tiles rounded up to it
  int64_t chunk;      // tiles a chunk, a multiple of rows_step
  int64_t splits;     // tasks a chunk: each takes a share of the output blocks (where chunks are fewer than threads)
  const uint16_t* x;
  const uint16_t* u;
  const float* bias;
  const uint16_t* add;
  uint16_t* y;

  // Elements between the 16 products' slices in the chunk's buffers v[16][chunk][C] and m[16][chunk][32] (dot) or
  // m[16][chunk][O] (amx): one cache line more than the slice, so the 16 lines a tile's transform touches at the
  // same offset in each slice do not all fall in one L1 set (slices a multiple of 4 KB long would: 16 lines into 12
  // ways).
  int64_t v_stride() const { return chunk * channels + 32; }
  int64_t m_stride(bool amx) const { return chunk * (amx ? out_channels : kStep) + 16; }
};

// A thread's scratch for the chunks' v and m, kept between calls (up to about 1 MB a thread): allocated anew per
// call, buffers past glibc's mmap threshold would be mapped and faulted in every call.
struct Scratch {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<char[], Free> data;
  size_t bytes = 0;

  char* get(size_t want) {
    want = (want + 63) / 64 * 64;
    if (want > bytes) {
      data.reset(static_cast<char*>(std::aligned_alloc(64, want)));
      bytes = data ? want : 0;
      TORCH_CHECK(data != nullptr, "winograd_bf16: out of memory for a chunk's buffers");
    }
    return data.get();
  }
};

// A tile's 4x4 patch, 16 channels from c (bf16 widened exactly; zeros outside the image), to V = B^T d B rounded
// to bf16 (to nearest even), v[k][c..c+16) at out + k * stride.
CMFAST_BF16_INLINE void input_block(const uint16_t* const* rows, int64_t c, uint16_t* out, int64_t stride) {
  __m512 d[16];
  for (int k = 0; k < 16; ++k) {
    d[k] = rows[k] == nullptr ? _mm512_setzero_ps() : widen(rows[k] + c);
  }
  __m512 t[16];  // t = B^T d: along the patch's rows
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_sub_ps(d[j], d[8 + j]);
    t[4 + j] = _mm512_add_ps(d[4 + j], d[8 + j]);
    t[8 + j] = _mm512_sub_ps(d[8 + j], d[4 + j]);
    t[12 + j] = _mm512_sub_ps(d[4 + j], d[12 + j]);
  }
  for (int a = 0; a < 4; ++a) {  // V = t B: along its columns
    const __m512* r = t + 4 * a;
    store_bf16(out + (4 * a + 0) * stride + c, _mm512_sub_ps(r[0], r[2]));
    store_bf16(out + (4 * a + 1) * stride + c, _mm512_add_ps(r[1], r[2]));
    store_bf16(out + (4 * a + 2) * stride + c, _mm512_sub_ps(r[2], r[1]));
    store_bf16(out + (4 * a + 3) * stride + c, _mm512_sub_ps(r[1], r[3]));
  }
}

// A tile's 16 products (fp32, m[k][c..c+16) at m + k * stride) to Y = A^T M A, plus bias and residual in fp32,
// rounded once to bf16 into the tile's 2x2 pixels (nullptr outside the image), channels c..c+16.
CMFAST_BF16_INLINE void output_block(const float* m, int64_t stride, int64_t c, const float* bias,
                                    uint16_t* const* pixels, const uint16_t* const* adds) {
  __m512 s[8];  // s = A^T M: two rows of four
  for (int b = 0; b < 4; ++b) {
    const __m512 m0 = _mm512_loadu_ps(m + b * stride + c), m1 = _mm512_loadu_ps(m + (4 + b) * stride + c);
    const __m512 m2 = _mm512_loadu_ps(m + (8 + b) * stride + c), m3 = _mm512_loadu_ps(m + (12 + b) * stride + c);
    s[b] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
    s[4 + b] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
  }
  const __m512 beta = bias == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(bias + c);
  for (int r = 0; r < 2; ++r) {
    const __m512* q = s + 4 * r;
    const __m512 y[2] = {_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(q[0], q[1]), q[2]), beta),
                         _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(q[1], q[2]), q[3]), beta)};
    for (int col = 0; col < 2; ++col) {
      uint16_t* p = pixels[2 * r + col];
      if (p == nullptr) continue;
      const uint16_t* add = adds[2 * r + col];
      store_bf16(p + c, add == nullptr ? y[col] : _mm512_add_ps(y[col], widen(add + c)));
    }
  }
}

// m[k][t][o - o_begin] (rows of `width` floats, products `m_stride` floats apart) = sum over c of v[k][t][c]
// u[k][c][o] for t < rows and the output blocks [o_begin, o_end): product k outermost, then a 32-row step of V_k
// (held in L1 across the output blocks), then the output blocks (each's filters U_k block, read once per chunk).
CMFAST_AMX void amx_products(const Conv& p, const uint16_t* v, int64_t rows, int64_t o_begin, int64_t o_end,
                                  float* m, int64_t m_stride) {
  const int64_t c_count = p.channels, width = o_end - o_begin;
  for (int k = 0; k < 16; ++k) {
    const uint16_t* vk = v + k * p.v_stride();
    float* mk = m + k * m_stride;
    for (int64_t t0 = 0; t0 < rows; t0 += kStep) {
      for (int64_t o0 = o_begin; o0 < o_end; o0 += kStep) {
        const uint16_t* uk = p.u + o0 * 16 * c_count + k * c_count * kStep;
        zero_2x2();
        for (int64_t c0 = 0; c0 < c_count; c0 += kStep) {
          multiply_2x2(vk + t0 * c_count + c0, vk + (t0 + 16) * c_count + c0, c_count * 2, uk + c0 * kStep,
                       uk + c0 * kStep + kStep, kStep * 4);
        }
        store_2x2(mk + t0 * width + (o0 - o_begin), width);
      }
    }
  }
}

// R rows of one product by dot products: m[r][0..32) = sum over pairs w of v[r][2w, 2w + 1] . u[w][0..32) (each
// output's pair), r < R. The pair row of u is two registers; each row's pair is broadcast to all 16 lanes.
template <int R>
CMFAST_BF16_INLINE void dot_rows(const uint16_t* v, int64_t channels, const uint16_t* u, float* m) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t w = 0; w < channels / 2; ++w) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(u + w * 2 * kStep);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(u + w * 2 * kStep + kStep);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, v + r * channels + 2 * w, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(m + r * kStep, acc[r][0]);
    _mm512_storeu_ps(m + r * kStep + 16, acc[r][1]);
  }
}

CMFAST_BF16 void dot_products(const Conv& p, const uint16_t* v, const uint16_t* u_block, int64_t rows, float* m) {
  const int64_t c_count = p.channels;
  for (int k = 0; k < 16; ++k) {
    const uint16_t* uk = u_block + k * c_count * kStep;
    const uint16_t* vk = v + k * p.v_stride();
    float* mk = m + k * p.m_stride(false);
    int64_t t0 = 0;  // rows: a multiple of 4, in steps of 12 (24 accumulators), then 8 or 4
    for (; t0 + 12 <= rows; t0 += 12) dot_rows<12>(vk + t0 * c_count, c_count, uk, mk + t0 * kStep);
    if (rows - t0 == 8) dot_rows<8>(vk + t0 * c_count, c_count, uk, mk + t0 * kStep);
    if (rows - t0 == 4) dot_rows<4>(vk + t0 * c_count, c_count, uk, mk + t0 * kStep);
  }
}

// A task: a chunk's tiles [tile0, tile0 + count) and a share [o_begin, o_end) of its output channels.
struct Task {
  int64_t tile0, count, o_begin, o_end;
};

Task task_of(const Conv& p, int64_t task) {
  const int64_t blocks = p.out_channels / kStep, share = task % p.splits, tile0 = task / p.splits * p.chunk;
  return {tile0, std::min(p.chunk, p.g.tiles() - tile0), blocks * share / p.splits * kStep,
          blocks * (share + 1) / p.splits * kStep};
}

// Step 1 for the task's tiles into v. Its rows past count (up to the engine's step) keep stale values: the rows of m
// they give (a tile product's rows are independent) are never read.
CMFAST_BF16_INLINE void input_chunk(const Conv& p, const Task& t, uint16_t* v) {
  for (int64_t i = 0; i < t.count; ++i) {
    const uint16_t* patch[16];
    p.g.patch(p.x, p.channels, t.tile0 + i, patch);
    for (int64_t c = 0; c < p.channels; c += 16) input_block(patch, c, v + i * p.channels, p.v_stride());
  }
}

// Step 3 for the task's tiles and output channels [o0, o0 + width) from m[k][i][0..width) (`row` floats a tile).
CMFAST_BF16_INLINE void output_chunk(const Conv& p, const Task& t, const float* m, int64_t m_stride, int64_t row,
                                     int64_t o0, int64_t width) {
  const float* bias = p.bias == nullptr ? nullptr : p.bias + o0;
  for (int64_t i = 0; i < t.count; ++i) {
    uint16_t* pixels[4];
    const uint16_t* adds[4];
    p.g.outputs(p.y + o0, p.add == nullptr ? nullptr : p.add + o0, p.out_channels, t.tile0 + i, pixels, adds);
    for (int64_t c = 0; c < width; c += 16) output_block(m + i * row, m_stride, c, bias, pixels, adds);
  }
}

// The three steps of a task; v and m: this thread's buffers. AMX: all the share's output channels at once.
CMFAST_AMX void amx_task(const Conv& p, int64_t task, uint16_t* v, float* m) {
  const Task t = task_of(p, task);
  input_chunk(p, t, v);
  const int64_t rows = (t.count + kStep - 1) / kStep * kStep;
  amx_products(p, v, rows, t.o_begin, t.o_end, m, p.m_stride(true));
  output_chunk(p, t, m, p.m_stride(true), t.o_end - t.o_begin, t.o_begin, t.o_end - t.o_begin);
}

// dot: a block of 32 output channels at a time.
CMFAST_BF16 void dot_task(const Conv& p, int64_t task, uint16_t* v, float* m) {
  const Task t = task_of(p, task);
  input_chunk(p, t, v);
  const int64_t rows = (t.count + p.rows_step - 1) / p.rows_step * p.rows_step;
  for (int64_t o0 = t.o_begin; o0 < t.o_end; o0 += kStep) {
    dot_products(p, v, p.u + o0 * 16 * p.channels, rows, m);
    output_chunk(p, t, m, p.m_stride(false), kStep, o0, kStep);
  }
}

// This thread's buffers for a chunk's v and m.
struct Buffers {
  uint16_t* v;
  float* m;
};

Buffers thread_buffers(const Conv& p, bool amx) {
  static thread_local Scratch scratch;
  const size_t v_bytes = (16 * p.v_stride() * sizeof(uint16_t) + 63) / 64 * 64;
  char* buffer = scratch.get(v_bytes + 16 * p.m_stride(amx) * sizeof(float));
  return {reinterpret_cast<uint16_t*>(buffer), reinterpret_cast<float*>(buffer + v_bytes)};
}

// Tasks [first, last) on this thread, with its own buffers (and, for AMX, its tile configuration).
CMFAST_AMX void amx_tasks(const Conv& p, int64_t first, int64_t last) {
  const Buffers b = thread_buffers(p, true);
  configure_tiles();
  for (int64_t t = first; t < last; ++t) amx_task(p, t, b.v, b.m);
  _tile_release();
}

CMFAST_BF16 void dot_tasks(const Conv& p, int64_t first, int64_t last) {
  const Buffers b = thread_buffers(p, false);
  for (int64_t t = first; t < last; ++t) dot_task(p, t, b.v, b.m);
}

void check_bf16_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4, name,
              ": expected a 4-d bfloat16 CPU tensor");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": expected channels_last");
}

void winograd_bf16_op(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& add, const at::Tensor& y, c10::string_view engine_name) {
  const std::string engine(engine_name);
  const std::vector<std::string> engines = winograd_bf16_engines();
  TORCH_CHECK(std::find(engines.begin(), engines.end(), engine) != engines.end(), "winograd_bf16: this CPU cannot ",
              "run the engine '", engine, "' (it runs: ", engines.empty() ? "none" : c10::Join(", ", engines), ")");
  check_bf16_image(x, "winograd_bf16: x");
  check_bf16_image(y, "winograd_bf16: y");
  const int64_t channels = x.size(1), out_channels = y.size(1);
  TORCH_CHECK(channels % kStep == 0 && out_channels % kStep == 0,
              "winograd_bf16: the channel counts must be multiples of 32");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(2) == x.size(2) && y.size(3) == x.size(3),
              "winograd_bf16: y must be x's batch and image size");
  TORCH_CHECK(u.scalar_type() == at::kBFloat16 && u.is_contiguous() &&
                  u.sizes() == at::IntArrayRef({out_channels / kStep, 16, channels / 2, kStep, 2}),
              "winograd_bf16: u must be the packed filters, contiguous bfloat16 (O / 32, 16, C / 2, 32, 2)");
  if (add.has_value() && add->defined()) {
    check_bf16_image(*add, "winograd_bf16: add");
    TORCH_CHECK(add->sizes() == y.sizes(), "winograd_bf16: add must have the shape of y");
  }
  const Geometry g = geometry_of(x.size(0), x.size(2), x.size(3));
  const int64_t tiles = g.tiles();
  if (tiles == 0) return;
  // As many tiles a chunk as keep its buffers in the engine's budget (dot: V in kChunkBytes; amx: V and M in
  // kAmxChunkBytes), but enough chunks for every thread; where the image has too few tiles for that (8x8 at batch
  // 1: 16 tiles, one step of AMX rows), each chunk's output blocks are shared among tasks, each transforming the
  // chunk's input anew.
  const bool amx = engine == "amx";
  const int64_t step = amx ? kStep : 4;  // AMX: two 16-row tiles; dot: rows in 12, 8 or 4
  const int64_t threads = at::get_num_threads();
  // The chunk holds at least 32 tiles where the image has them, even past the budget: each chunk reads all the
  // transformed filters, 16 C O bf16 (10 MB at 576 -> 576 channels), and smaller chunks read them more often (dot
  // engine, 4x576x16x16 on the Xeon: 13 ms in chunks of 32 tiles, 14 in chunks of 28).
  const int64_t fit = amx ? std::clamp(kAmxChunkBytes / (16 * (2 * channels + 4 * out_channels)) / kStep * kStep,
                                       kStep, kAmxMaxChunkTiles)
                          : std::clamp(kChunkBytes / (16 * channels * 2) / kStep * kStep, kStep, kMaxChunkTiles);
  const int64_t share = ((tiles + threads - 1) / threads + step - 1) / step * step;
  // amx: a thread's share in chunks of about equal size (a share of 128 tiles in two chunks of 96 and 32 would
  // leave the threads unevenly loaded)
  const int64_t pieces = amx ? (share + fit - 1) / fit : 1;
  const int64_t chunk = amx ? ((share + pieces - 1) / pieces + step - 1) / step * step : std::min(fit, share);
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const int64_t splits = std::clamp((threads + chunks - 1) / chunks, int64_t{1}, out_channels / kStep);
  const Conv p{g,
               channels,
               out_channels,
               step,
               chunk,
               splits,
               static_cast<const uint16_t*>(x.const_data_ptr()),
               static_cast<const uint16_t*>(u.const_data_ptr()),
               optional_f32(bias, {out_channels}, y, "winograd_bf16: bias"),
               add.has_value() && add->defined() ? static_cast<const uint16_t*>(add->const_data_ptr()) : nullptr,
               static_cast<uint16_t*>(y.data_ptr())};
  at::parallel_for(0, chunks * splits, 1, [&](int64_t first, int64_t last) {
    amx ? amx_tasks(p, first, last) : dot_tasks(p, first, last);
  });
}

}  // namespace

std::vector<std::string> winograd_bf16_engines() {
  std::vector<std::string> engines;
  if (cpu_runs_avx512_bf16() && cpu_runs_amx_bf16()) engines.push_back("amx");
  if (cpu_runs_avx512_bf16()) engines.push_back("dot");
  return engines;
}

}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) {
  m.def("winograd_bf16(Tensor x, Tensor u, Tensor? bias, Tensor? add, Tensor(a!) y, str engine) -> ()");
}

TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) { m.impl("winograd_bf16", &cmfast::winograd_bf16_op); }
