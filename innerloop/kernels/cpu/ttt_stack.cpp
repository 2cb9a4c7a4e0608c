// The dual form of mini-batch TTT for a stack of affine layers on the CPU: whole mini-batches and
// one-token decoding without autograd, and for training the scans of one-layer and deeper stacks with
// their hand-written backwards (the last two sections).
//
// One call runs whole mini-batches for every (batch, head) pair; each pair is an independent
// recurrence, so the pairs are split between threads. Inside a pair everything (the inner weights,
// one mini-batch of inputs, the intermediate activations) stays in a per-thread workspace small
// enough for the L2 cache, and each mini-batch is a handful of small matrix products plus the
// elementwise work fused around them. The math is derived in ../README.md and in README.md here;
// the numbers equal innerloop.kernels.reference (tested to 1e-10 in float64).
//
// The interface is plain C (a struct of sizes, strides and pointers), loaded with ctypes: no torch
// headers are needed, so the file compiles in a couple of seconds with any C++17 compiler.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

// Before a loop whose iterations touch disjoint elements (outputs that alias none of its inputs): the
// compiler may vectorise it without proving that. A loop writing several rows through pointers into
// the caller's tensors is otherwise left scalar (too many pairs to check for overlap at run time).
#if defined(__clang__)
#define INDEPENDENT_ITERATIONS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#else
#define INDEPENDENT_ITERATIONS
#endif

namespace {

enum Activation : int32_t { kIdentity = 0, kGeluTanh = 1 };
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1 };

constexpr int kMaxLayers = 8;

}  // namespace

extern "C" {

// Everything one call needs. Strides are in elements; the last dimension of every tensor but lr is
// contiguous (lr is read through all three of its strides: a transposed gate needs no copy). Shapes:
// xq, xk, xv, out [B, H, T, f]; lr [B, H, T]; tau [K]; ln_weight, ln_bias [H, f];
// weights[l] [B, H, dims[l], dims[l+1]] and biases[l] [B, H, dims[l+1]] (or null), both contiguous
// and updated in place to the weights after the last mini-batch.
struct InnerloopStackArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t batch, heads, tokens, mini_batch;
  int32_t num_layers;
  int64_t dims[kMaxLayers + 1];
  int32_t activations[kMaxLayers];
  const void* xq;
  const void* xk;
  const void* xv;
  const void* lr;
  int64_t xq_strides[3], xk_strides[3], xv_strides[3], lr_strides[3];
  const void* tau;
  const void* ln_weight;
  const void* ln_bias;
  double eps;
  void* weights[kMaxLayers];
  void* biases[kMaxLayers];
  void* out;
  int64_t out_strides[3];
};

// One token per sequence, continuing a mini-batch: the weights at the mini-batch's start, and the
// pending sums of lr-scaled gradients of its earlier tokens. Shapes: xq, xk, xv, out [B, H, f];
// lr [B, H]; weights/biases as above (read, and written only when the token closes the mini-batch);
// pending_weights/pending_biases the same shapes, contiguous, updated in place (zeroed on closing).
struct InnerloopDecodeArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t batch, heads;
  int32_t num_layers;
  int64_t dims[kMaxLayers + 1];
  int32_t activations[kMaxLayers];
  const void* xq;
  const void* xk;
  const void* xv;
  const void* lr;
  int64_t xq_strides[2], xk_strides[2], xv_strides[2], lr_strides[2];
  double tau;       // tau_i of the token's index in its mini-batch
  int32_t is_last;  // the token closes its mini-batch: commit W_b - tau_i * pending, zero pending
  const void* ln_weight;
  const void* ln_bias;
  double eps;
  void* weights[kMaxLayers];
  void* biases[kMaxLayers];
  void* pending_weights[kMaxLayers];
  void* pending_biases[kMaxLayers];
  void* out;
  int64_t out_strides[2];
};

// Training TTT-Linear (a one-layer stack): the scan on the fused torch path's hoisted inputs, with the
// bias folded into the weight as its last input row. NB mini-batches of K tokens, P (batch, head)
// pairs, input width `in`, width f; every tensor contiguous and row-major:
// both [NB, P, 2K, in] (keys, then queries); left [NB, P, K + in, K]; shift [NB, P, K, f];
// gamma_sq [P, f]; weight [P, in, f] (forward: updated in place to the last mini-batch's weights);
// starts [NB, P, in, f] (forward: written, the weights at every mini-batch's start; backward: read);
// z [P, NB, K, f] (forward: written, the outputs before the output LayerNorm; pair-major, so that the
// output LayerNorm reads it as [B, H, T, f] with no copy). Backward: grad_z [P, NB, K, f]; grad_weight
// [P, in, f] (in: d loss / d the last weights; out: d loss / d weight); grad_both, grad_left, grad_shift
// (the inputs' shapes) and grad_gamma_sq [P, f] written.
struct InnerloopLinearScanArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t num_mini_batches, pairs, mini_batch, in, width;
  double eps;
  const void* both;
  const void* left;
  const void* shift;
  const void* gamma_sq;
  void* weight;
  void* starts;
  void* z;
  const void* grad_z;
  void* grad_weight;
  void* grad_both;
  void* grad_left;
  void* grad_shift;
  void* grad_gamma_sq;
};

// Training a deeper stack (TTT-MLP): as above for L >= 2 layers, each weight folded with its bias as its
// last input row. in_dims/out_dims: each folded weight's shape; has_bias[l] (l >= 1): layer l's inputs
// take a column of ones (layer 0's come with it in `both`), so in_dims[l] = out_dims[l - 1] + has_bias[l];
// activations[l]: between layer l and l + 1. Besides the one-layer scan's tensors (f = out_dims[L - 1]):
// eta [NB, P, K, K] (tau_i lr_j, zero above the diagonal) and scale [NB, P, K] (tau_{K-1} lr_j), which
// the later layers use; weights[l] [P, in, out] and starts[l] [NB, P, in, out] per layer, and in the
// backward grad_weights[l] [P, in, out] (in: d loss / d the last weights; out: d loss / d weights),
// grad_eta and grad_scale written; records: what the forward keeps of each mini-batch for the backward.
struct InnerloopStackScanArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t num_mini_batches, pairs, mini_batch;
  int32_t num_layers;
  int64_t in_dims[kMaxLayers];
  int64_t out_dims[kMaxLayers];
  int32_t has_bias[kMaxLayers];
  int32_t activations[kMaxLayers];
  double eps;
  const void* both;
  const void* left;
  const void* shift;
  const void* gamma_sq;
  const void* eta;
  const void* scale;
  void* weights[kMaxLayers];
  void* starts[kMaxLayers];
  void* z;
  const void* grad_z;
  void* grad_weights[kMaxLayers];
  void* grad_both;
  void* grad_left;
  void* grad_shift;
  void* grad_gamma_sq;
  void* grad_eta;
  void* grad_scale;
  int64_t record_size;  // stack_record_size of these sizes: elements per (mini-batch, pair) record
  void* records;        // [NB, P, record_size]: forward writes, backward reads (see StackRecord)
};

// Training, around either scan: what the scans take that does not depend on the inner weights, computed
// from the layer's views for all mini-batches (the "hoisting" of ../fused_torch/forward.py:_hoist), and
// its backward. xq, xk, xv [B, H, T, f] and lr [B, H, T] are strided (the last dim of the views
// contiguous); tau [K]; ln_weight, ln_bias [H, f]; bias: the first layer has a bias (both takes a column
// of ones and left its row of scales), in = f + bias. Written by the forward, read as gradients by the
// backward (each contiguous, P = B H pairs): both [NB, P, 2K, in], left [NB, P, K + in, K],
// shift [NB, P, K, f], gamma_sq [P, f], eta [NB, P, K, K], scale [NB, P, K] (grad_eta and grad_scale may
// be null: a one-layer scan reads them only through left). The backward writes grad_xq, grad_xk,
// grad_xv (strided like the views) and grad_lr [B, H, T] (contiguous), and per pair the partial sums
// grad_tau [P, K], grad_ln_weight and grad_ln_bias [P, f] that the host adds up.
struct InnerloopHoistArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t batch, heads, tokens, mini_batch, width;
  int32_t bias;
  const void* xq;
  const void* xk;
  const void* xv;
  const void* lr;
  int64_t xq_strides[3], xk_strides[3], xv_strides[3], lr_strides[3];
  const void* tau;
  const void* ln_weight;
  const void* ln_bias;
  void* both;
  void* left;
  void* shift;
  void* gamma_sq;
  void* eta;
  void* scale;
  void* grad_xq;
  void* grad_xk;
  void* grad_xv;
  int64_t grad_xq_strides[3], grad_xk_strides[3], grad_xv_strides[3];
  void* grad_lr;
  void* grad_tau;
  void* grad_ln_weight;
  void* grad_ln_bias;
};

// Training, after either scan: out = xq + ln_weight * LN(z) + ln_bias per row (the output LayerNorm and
// residual), and its backward. z [B, H, T, f] contiguous (the scans' pair-major output); xq as above;
// out [B, H, T, f] strided (the host passes a view of [B, T, H, f] memory). Backward: grad_out strided,
// grad_z [B, H, T, f] contiguous written, and per pair the partial sums grad_ln_weight, grad_ln_bias
// [P, f]; the residual's gradient is grad_out itself (the host passes it on).
struct InnerloopOutputNormArgs {
  int32_t dtype;
  int32_t num_threads;
  int64_t batch, heads, tokens, width;
  double eps;
  const void* z;
  const void* xq;
  int64_t xq_strides[3];
  const void* ln_weight;
  const void* ln_bias;
  void* out;
  int64_t out_strides[3];
  const void* grad_out;
  int64_t grad_out_strides[3];
  void* grad_z;
  void* grad_ln_weight;
  void* grad_ln_bias;
};

}  // extern "C"

namespace {

// ---------------------------------------------------------------------------------------------
// Small matrix products, row-major. C (+/-)= A @ B with A [m x k], B [k x n]. Register tiles of
// kRows x kCols outputs; gcc/clang vectorize the column loop of the tile.
// ---------------------------------------------------------------------------------------------

// GCC/clang vector extensions: one register of T, 512 bits where the build targets AVX-512 (16 floats
// or 8 doubles), else 256 bits (8 or 4). On targets without such registers the compiler splits them;
// the arithmetic is the same.
template <typename T>
struct Vector;
#ifdef __AVX512F__
constexpr int kVectorBytes = 64;  // one AVX-512 register
#else
constexpr int kVectorBytes = 32;
#endif
template <>
struct Vector<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Vector<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
inline typename Vector<T>::type load(const T* p) {
  typename Vector<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vector<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// A kRows x (kVectors * lanes) tile of C from kRows rows of A and a [depth x cols] slice of B: the
// accumulators live in registers for the whole depth loop. A is read through two strides (row and
// depth), so a transposed A costs nothing: element (r, p) is a[r * a_row + p * a_depth].
template <typename T, int kRows, int kVectors>
inline void gemm_tile(int64_t depth, const T* a, int64_t a_row, int64_t a_depth, const T* b, int64_t ldb,
                      T* c, int64_t ldc, T scale, bool accumulate) {
  using V = typename Vector<T>::type;
  constexpr int kLanes = sizeof(V) / sizeof(T);
  V acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < depth; ++p) {
    V b_row[kVectors];
    for (int v = 0; v < kVectors; ++v) b_row[v] = load(b + p * ldb + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const T a_rp = a[r * a_row + p * a_depth];
      for (int v = 0; v < kVectors; ++v) acc[r][v] += a_rp * b_row[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVectors; ++v) {
      T* out = c + r * ldc + v * kLanes;
      store(out, accumulate ? load(out) + scale * acc[r][v] : scale * acc[r][v]);
    }
}

// Remainder tiles (shapes not multiple of the register tile): same arithmetic, runtime sizes.
template <typename T>
inline void gemm_edge(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t a_row, int64_t a_depth,
                      const T* b, int64_t ldb, T* c, int64_t ldc, T scale, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < cols; ++col) {
      T acc = T(0);
      for (int64_t p = 0; p < depth; ++p) acc += a[r * a_row + p * a_depth] * b[p * ldb + col];
      c[r * ldc + col] = (accumulate ? c[r * ldc + col] : T(0)) + scale * acc;
    }
}

// All rows of A against one block of kVectors * lanes columns of B: tiles of 6 rows (12 accumulators,
// 2 B vectors and a broadcast fit AVX2's 16 vector registers; AVX-512 has 32), then one tile for the rest.
template <typename T, int kVectors>
inline void gemm_column_block(int64_t m, int64_t k, const T* a, int64_t a_row, int64_t a_depth, const T* b,
                              int64_t ldb, T* c, int64_t ldc, T scale, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    gemm_tile<T, 6, kVectors>(k, a + i * a_row, a_row, a_depth, b, ldb, c + i * ldc, ldc, scale, accumulate);
  const T* a_rest = a + i * a_row;
  T* c_rest = c + i * ldc;
  switch (m - i) {
    case 5: gemm_tile<T, 5, kVectors>(k, a_rest, a_row, a_depth, b, ldb, c_rest, ldc, scale, accumulate); break;
    case 4: gemm_tile<T, 4, kVectors>(k, a_rest, a_row, a_depth, b, ldb, c_rest, ldc, scale, accumulate); break;
    case 3: gemm_tile<T, 3, kVectors>(k, a_rest, a_row, a_depth, b, ldb, c_rest, ldc, scale, accumulate); break;
    case 2: gemm_tile<T, 2, kVectors>(k, a_rest, a_row, a_depth, b, ldb, c_rest, ldc, scale, accumulate); break;
    case 1: gemm_tile<T, 1, kVectors>(k, a_rest, a_row, a_depth, b, ldb, c_rest, ldc, scale, accumulate); break;
    default: break;
  }
}

// C = scale * A @ B (accumulate=false) or C += scale * A @ B (accumulate=true), with C [m x n] and
// B [k x n] row-major, A [m x k] read as a[i * a_row + p * a_depth] (a_row = k, a_depth = 1 for a
// row-major A; a_row = 1, a_depth = m for the transpose of a row-major [k x m] matrix).
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_depth, const T* b, int64_t ldb,
          T* c, int64_t ldc, T scale, bool accumulate) {
  constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  // Column blocks outside, row blocks inside: a [k x columns] slice of B stays in L1 while every row
  // block of A passes over it (the inner weights of TTT-MLP do not fit in L1 as a whole).
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes)
    gemm_column_block<T, 2>(m, k, a, a_row, a_depth, b + j, ldb, c + j, ldc, scale, accumulate);
  for (; j + kLanes <= n; j += kLanes)
    gemm_column_block<T, 1>(m, k, a, a_row, a_depth, b + j, ldb, c + j, ldc, scale, accumulate);
  if (j < n) gemm_edge<T>(m, n - j, k, a, a_row, a_depth, b + j, ldb, c + j, ldc, scale, accumulate);
}

#if defined(__AVX512F__)
// A 16 x 16 block of floats transposed in registers: rows[i] holds row i on entry, column i on exit.
inline void transpose_16x16(__m512* rows) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    rows[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    rows[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    rows[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    rows[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(rows[8 * i + j], rows[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(rows[8 * i + j], rows[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    rows[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    rows[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}
#endif

template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, T* dst) {  // dst [cols x rows]
  int64_t done = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (rows % 16 == 0) {
      done = cols - cols % 16;
      __m512 block[16];
      for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c0 = 0; c0 < done; c0 += 16) {
          for (int j = 0; j < 16; ++j) block[j] = _mm512_loadu_ps(src + (r0 + j) * cols + c0);
          transpose_16x16(block);
          for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + (c0 + j) * rows + r0, block[j]);
        }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = done; col < cols; ++col) dst[col * rows + r] = src[r * cols + col];
}

// out [k x cols] (+)= scale * src^T for src [cols x k].
template <typename T>
void transpose_scaled_into(int64_t k, int64_t cols, const T* src, T* out, T scale, bool accumulate) {
  int64_t done = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (k % 16 == 0) {
      done = cols - cols % 16;
      __m512 block[16];
      const __m512 factor = _mm512_set1_ps(scale);
      for (int64_t i0 = 0; i0 < k; i0 += 16)
        for (int64_t c0 = 0; c0 < done; c0 += 16) {
          for (int j = 0; j < 16; ++j) block[j] = _mm512_loadu_ps(src + (c0 + j) * k + i0);
          transpose_16x16(block);
          for (int i = 0; i < 16; ++i) {
            T* row = out + (i0 + i) * cols + c0;
            const __m512 value = _mm512_mul_ps(factor, block[i]);
            _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), value) : value);
          }
        }
    }
  }
#endif
  for (int64_t i = 0; i < k; ++i)
    for (int64_t col = done; col < cols; ++col) {
      const T value = scale * src[col * k + i];
      out[i * cols + col] = accumulate ? out[i * cols + col] + value : value;
    }
}

// Sums over a whole sequence of a pair (the gradients of parameters every token shares): each block's
// partial sums (a mini-batch's, or a run of tokens', in T) are added up in double, so that float32's
// rounding does not grow with the sequence's length, as a sequential float32 sum's does (the torch
// path reduces over the tokens pairwise). A block is summed in T where the host reads the result
// (``out``: a scratch buffer elsewhere ran the hoisting's backward 1.3x slower), zeroed before it.
template <typename T>
struct LongSum {
  T* out;                     // [n], the block's partial sums, then the whole sums
  std::vector<double> total;  // the blocks' so far
  LongSum(T* out_, int64_t n) : out(out_), total(n, 0.0) {}
  T* start_block() {
    std::fill(out, out + total.size(), T(0));
    return out;
  }
  void end_block() {
    for (size_t i = 0; i < total.size(); ++i) total[i] += static_cast<double>(out[i]);
  }
  void write() const {
    for (size_t i = 0; i < total.size(); ++i) out[i] = static_cast<T>(total[i]);
  }
};

// ---------------------------------------------------------------------------------------------
// Elementwise pieces
// ---------------------------------------------------------------------------------------------

// tanh for float32 without a library call, so that loops over it vectorize: tanh(u) = 1 - 2 / (e^2u + 1)
// with e^x = 2^n e^r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial. The absolute error is
// below 2e-7 everywhere (tested against torch.tanh); float64 keeps std::tanh.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  n = n == n ? n : 0.0f;  // NaN stays NaN through p below; the cast to int must not see it
  float r = x - n * 0.693145751953125f;  // ln 2 split in two for an exact first product
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float tanh_of(float u) {
  u = std::min(std::max(u, -10.0f), 10.0f);  // |tanh| rounds to 1 beyond
  return 1.0f - 2.0f / (exp_f32(2.0f * u) + 1.0f);
}

inline double tanh_of(double u) { return std::tanh(u); }

// tanh-GELU forward (torch's constant sqrt(2/pi)) and the reference's derivative polynomial, whose
// constants are truncated (0.79788456); see innerloop.core.functional.
template <typename T>
inline T gelu_tanh(T x) {
  const T inner = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
  return T(0.5) * x * (T(1) + tanh_of(inner));
}

template <typename T>
inline T gelu_tanh_derivative(T x) {
  x = std::min(std::max(x, T(-100)), T(100));  // exactly 0 or 1 beyond; keeps x * x from overflowing
  const T t = tanh_of(T(0.79788456) * x * (T(1) + T(0.044715) * x * x));
  return T(0.5) * x * ((T(1) - t * t) * (T(0.79788456) + T(0.1070322243) * x * x)) + T(0.5) * (T(1) + t);
}

template <typename T>
void activate(int32_t activation, int64_t count, const T* src, T* dst) {
  if (activation == kGeluTanh) {
    for (int64_t i = 0; i < count; ++i) dst[i] = gelu_tanh(src[i]);
  } else {
    std::memcpy(dst, src, count * sizeof(T));
  }
}

// grad *= act'(pre), elementwise.
template <typename T>
void scale_by_derivative(int32_t activation, int64_t count, const T* pre, T* grad) {
  if (activation == kGeluTanh)
    for (int64_t i = 0; i < count; ++i) grad[i] *= gelu_tanh_derivative(pre[i]);
}

// sum_i term(i) for i < n, in kParts independent partial sums (a fixed order, so the result is
// deterministic) that the compiler keeps in vector registers: a plain running sum would be one long
// chain of dependent additions, which compilers may not reorder.
template <typename T, typename Term>
inline T sum_over(int64_t n, Term term) {
  constexpr int kParts = 64 / sizeof(T);
  T parts[kParts] = {};
  int64_t i = 0;
  for (; i + kParts <= n; i += kParts)
    for (int j = 0; j < kParts; ++j) parts[j] += term(i + j);
  for (int j = 0; i < n; ++i, ++j) parts[j] += term(i);
  for (int half = kParts / 2; half > 0; half /= 2)  // pairwise: halves of a register, not a serial chain
    for (int j = 0; j < half; ++j) parts[j] += parts[j + half];
  return parts[0];
}

// The largest |row[i]|, NaNs ignored (std::max(top, |x|) leaves top alone for a NaN x), a register of
// running maxima at a time: one running maximum is a chain of dependent comparisons, the slowest part
// of a 64-wide row's moments. Maxima do not round, so the order does not change the result.
template <typename T>
inline T max_abs_over(int64_t n, const T* row) {
  using V = typename Vector<T>::type;
  constexpr int kLanes = kVectorBytes / sizeof(T);
  V top_lanes = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V value = load<T>(row + i);
    const V magnitude = value < T(0) ? -value : value;
    top_lanes = top_lanes < magnitude ? magnitude : top_lanes;  // a NaN lane compares false: kept out
  }
  T top = T(0);
  for (int j = 0; j < kLanes; ++j) top = std::max(top, top_lanes[j]);
  for (; i < n; ++i) top = std::max(top, std::abs(row[i]));
  return top;
}

// 2^exponent for a normal exponent, from its bits (std::ldexp is a library call, once per row here).
template <typename T>
inline T power_of_two(int exponent) {
  if constexpr (sizeof(T) == 4) {
    const int32_t bits = (exponent + 127) << 23;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    const int64_t bits = static_cast<int64_t>(exponent + 1023) << 52;
    double value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  }
}

// Mean and 1/std of one row, as torch's layer_norm computes them (biased variance). A row whose
// squares could overflow (largest |value| above 2^limit, limit as in overflow_safe_scale in
// core/functional.py) takes its moments on a copy scaled to a largest |value| of 2^limit: LayerNorm is
// scale-invariant, and such a row's variance dwarfs eps. Ordinary rows are computed as before.
template <typename T>
inline void row_moments(int64_t width, const T* row, T eps, T* mean_out, T* rstd_out) {
  const T top = max_abs_over(width, row);
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(width));  // width's bit length (width >= 1)
  const T limit = power_of_two<T>((std::numeric_limits<T>::max_exponent - 4 - bits) / 2);
  if (!(top > limit)) {  // ordinary rows (and NaN ones), the common case: no scaling at all
    const T mean = sum_over<T>(width, [&](int64_t i) { return row[i]; }) / T(width);
    const T sq = sum_over<T>(width, [&](int64_t i) { return (row[i] - mean) * (row[i] - mean); });
    *mean_out = mean;
    *rstd_out = T(1) / std::sqrt(sq / T(width) + eps);
    return;
  }
  const T scale = limit / top;
  const T mean = sum_over<T>(width, [&](int64_t i) { return row[i] * scale; }) / T(width);
  const T sq = sum_over<T>(width, [&](int64_t i) { return (row[i] * scale - mean) * (row[i] * scale - mean); });
  *mean_out = mean / scale;
  *rstd_out = scale / std::sqrt(sq / T(width) + eps);
}

// ---------------------------------------------------------------------------------------------
// One (batch, head) pair: the whole scan over mini-batches
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Workspace {
  // Per layer l: key inputs X_l [K x d_l], key pre-activations Z_l [K x d_{l+1}], query inputs,
  // query pre-activations and inner gradients G_l [K x d_{l+1}]; plus scratch for small transposes
  // and the lr-scaled gradients.
  std::vector<std::vector<T>> key_in, key_pre, query_in, query_pre, grad;
  std::vector<T> scratch_a, scratch_b, mix, xv, lr, update_scale;

  Workspace(int32_t layers, const int64_t* dims, int64_t k) {
    key_in.resize(layers);
    key_pre.resize(layers);
    query_in.resize(layers);
    query_pre.resize(layers);
    grad.resize(layers);
    int64_t widest = 0;
    for (int32_t l = 0; l < layers; ++l) {
      key_in[l].resize(k * dims[l]);
      query_in[l].resize(k * dims[l]);
      key_pre[l].resize(k * dims[l + 1]);
      query_pre[l].resize(k * dims[l + 1]);
      grad[l].resize(k * dims[l + 1]);
      widest = std::max({widest, dims[l], dims[l + 1]});
    }
    scratch_a.resize(k * widest);
    scratch_b.resize(k * widest);
    mix.resize(k * k);
    lr.resize(k);
    update_scale.resize(k);
    xv.resize(k * dims[0]);
  }
};

// One (batch, head) pair's view of a call's tensors: where its rows start, its LayerNorm affine and
// its inner weights. Built once per pair and shared by the helpers below, for the scan and decoding.
template <typename T>
struct PairView {
  int32_t layers;
  const int64_t* dims;         // [layers + 1]: dims[0] = f, dims[layers] = the output width
  const int32_t* activations;  // [layers]
  const T *xq, *xk, *xv, *lr;  // this pair's first row (scan) or only row (decoding)
  T* out;
  const T *gamma, *beta;  // [f]
  T eps;
  T* weights[kMaxLayers];  // [dims[l] x dims[l+1]], updated in place
  T* biases[kMaxLayers];   // [dims[l+1]], or null
};

// Args is InnerloopStackArgs or InnerloopDecodeArgs: the same fields, strides of their own rank.
template <typename T, typename Args>
PairView<T> make_pair_view(const Args& args, int64_t pair) {
  const int64_t b = pair / args.heads, h = pair % args.heads;
  const int64_t f = args.dims[0];
  PairView<T> view;
  view.layers = args.num_layers;
  view.dims = args.dims;
  view.activations = args.activations;
  view.xq = static_cast<const T*>(args.xq) + b * args.xq_strides[0] + h * args.xq_strides[1];
  view.xk = static_cast<const T*>(args.xk) + b * args.xk_strides[0] + h * args.xk_strides[1];
  view.xv = static_cast<const T*>(args.xv) + b * args.xv_strides[0] + h * args.xv_strides[1];
  view.lr = static_cast<const T*>(args.lr) + b * args.lr_strides[0] + h * args.lr_strides[1];
  view.out = static_cast<T*>(args.out) + b * args.out_strides[0] + h * args.out_strides[1];
  view.gamma = static_cast<const T*>(args.ln_weight) + h * f;
  view.beta = static_cast<const T*>(args.ln_bias) + h * f;
  view.eps = T(args.eps);
  for (int32_t l = 0; l < args.num_layers; ++l) {
    const int64_t weight_size = args.dims[l] * args.dims[l + 1];
    view.weights[l] = static_cast<T*>(args.weights[l]) + pair * weight_size;
    view.biases[l] = args.biases[l] ? static_cast<T*>(args.biases[l]) + pair * args.dims[l + 1] : nullptr;
  }
  return view;
}

// z[i, c] += bias[c] for each of the rows rows of z [rows x width].
template <typename T>
static inline void add_bias_rows(int64_t rows, int64_t width, const T* bias, T* z) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < width; ++c) z[i * width + c] += bias[c];
}

// One row of d loss / d xhat for the reconstruction target xv - xk, written to g_row, and the two sums
// that the LayerNorm backward needs: sum_c g and sum_c g * xhat (xhat = (z - mean) * rstd).
template <typename T>
static inline void ln_target_gradient_row(int64_t width, const T* z_row, T mean, T rstd, const T* gamma,
                                          const T* beta, const T* xv_row, const T* xk_row, T* g_row, T* sum_g,
                                          T* sum_gx) {
  for (int64_t c = 0; c < width; ++c) {
    const T xhat = (z_row[c] - mean) * rstd;
    g_row[c] = gamma[c] * (gamma[c] * xhat + beta[c] - xv_row[c] + xk_row[c]);
  }
  *sum_g = sum_over<T>(width, [&](int64_t c) { return g_row[c]; });
  *sum_gx = sum_over<T>(width, [&](int64_t c) { return g_row[c] * ((z_row[c] - mean) * rstd); });
}

// One output row: xq + LN(z).
template <typename T>
static inline void write_output_row(const PairView<T>& view, const T* z_row, const T* xq_row, T* out_row) {
  const int64_t width = view.dims[view.layers];
  T mean, rstd;
  row_moments(width, z_row, view.eps, &mean, &rstd);
  for (int64_t c = 0; c < width; ++c)
    out_row[c] = xq_row[c] + view.gamma[c] * ((z_row[c] - mean) * rstd) + view.beta[c];
}

// ---- this mini-batch's inputs, gathered into contiguous rows, its learning rates and update scales
template <typename T>
static inline void gather_mini_batch(const InnerloopStackArgs& args, const PairView<T>& view, int64_t start,
                                     Workspace<T>& ws) {
  const int64_t k = args.mini_batch, f = args.dims[0];
  const T* tau = static_cast<const T*>(args.tau);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = start + i;
    std::memcpy(&ws.key_in[0][i * f], view.xk + t * args.xk_strides[2], f * sizeof(T));
    std::memcpy(&ws.query_in[0][i * f], view.xq + t * args.xq_strides[2], f * sizeof(T));
    std::memcpy(&ws.xv[i * f], view.xv + t * args.xv_strides[2], f * sizeof(T));
  }
  for (int64_t j = 0; j < k; ++j) {
    ws.lr[j] = view.lr[(start + j) * args.lr_strides[2]];
    ws.update_scale[j] = tau[k - 1] * ws.lr[j];  // the weight update's per-token scale
  }
}

// ---- key side: forward at the mini-batch's starting weights
template <typename T>
static inline void key_side_forward(const PairView<T>& view, int64_t k, Workspace<T>& ws) {
  for (int32_t l = 0; l < view.layers; ++l) {
    const int64_t in = view.dims[l], width = view.dims[l + 1];
    T* z = ws.key_pre[l].data();
    gemm<T>(k, width, in, ws.key_in[l].data(), in, 1, view.weights[l], width, z, width, T(1), false);
    if (view.biases[l]) add_bias_rows(k, width, view.biases[l], z);
    if (l + 1 < view.layers) activate<T>(view.activations[l], k * width, z, ws.key_in[l + 1].data());
  }
}

// ---- the inner gradient through the LayerNorm: G_{L-1} [K x out_features]
template <typename T>
static inline void layer_norm_gradient(const PairView<T>& view, int64_t k, Workspace<T>& ws) {
  const int64_t f = view.dims[0], out_features = view.dims[view.layers];
  const T* z = ws.key_pre[view.layers - 1].data();
  T* g = ws.grad[view.layers - 1].data();
  for (int64_t i = 0; i < k; ++i) {
    T mean, rstd, sum_g, sum_gx;
    row_moments(out_features, z + i * out_features, view.eps, &mean, &rstd);
    T* g_row = g + i * out_features;
    const T* z_row = z + i * out_features;
    ln_target_gradient_row(out_features, z_row, mean, rstd, view.gamma, view.beta, &ws.xv[i * f],
                           &ws.key_in[0][i * f], g_row, &sum_g, &sum_gx);
    const T inv_width = T(1) / T(out_features);
    for (int64_t c = 0; c < out_features; ++c) {
      const T xhat = (z_row[c] - mean) * rstd;
      g_row[c] = rstd * (g_row[c] - sum_g * inv_width - xhat * sum_gx * inv_width);
    }
  }
}

// ---- back through the stack at the old weights: G_{l-1} = (G_l W_l^T) * act'(Z_{l-1})
template <typename T>
static inline void backpropagate_stack(const PairView<T>& view, int64_t k, Workspace<T>& ws) {
  for (int32_t l = view.layers - 1; l > 0; --l) {
    const int64_t in = view.dims[l], width = view.dims[l + 1];
    // G_l W_l^T, computed as its transpose W_l G_l^T so that only the small G's are transposed,
    // never the weights
    transpose<T>(k, width, ws.grad[l].data(), ws.scratch_a.data());  // G_l^T [width x K]
    gemm<T>(in, k, width, view.weights[l], width, 1, ws.scratch_a.data(), k, ws.scratch_b.data(), k, T(1), false);
    transpose<T>(in, k, ws.scratch_b.data(), ws.grad[l - 1].data());
    scale_by_derivative<T>(view.activations[l - 1], k * in, ws.key_pre[l - 1].data(), ws.grad[l - 1].data());
  }
}

// ---- query side (the dual form) and the weight updates, layer by layer
template <typename T>
static inline void query_side_and_update(const PairView<T>& view, int64_t k, const T* tau, Workspace<T>& ws) {
  const T* lr_k = ws.lr.data();
  for (int32_t l = 0; l < view.layers; ++l) {
    const int64_t in = view.dims[l], width = view.dims[l + 1];
    const T* xq_l = ws.query_in[l].data();
    const T* xk_l = ws.key_in[l].data();
    const T* g = ws.grad[l].data();
    T* zq = ws.query_pre[l].data();
    T* bias = view.biases[l];
    gemm<T>(k, width, in, xq_l, in, 1, view.weights[l], width, zq, width, T(1), false);
    if (bias) add_bias_rows(k, width, bias, zq);
    // mix[i, j] = tau_i lr_j (xq_i . xk_j + [bias]) for j <= i, else 0
    transpose<T>(k, in, xk_l, ws.scratch_a.data());  // X_l^T [in x K]
    gemm<T>(k, k, in, xq_l, in, 1, ws.scratch_a.data(), k, ws.mix.data(), k, T(1), false);
    const T bias_term = bias ? T(1) : T(0);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        ws.mix[i * k + j] = j <= i ? tau[i] * lr_k[j] * (ws.mix[i * k + j] + bias_term) : T(0);
    gemm<T>(k, width, k, ws.mix.data(), k, 1, g, width, zq, width, T(-1), true);
    // W_l -= X_l^T (s G_l), b_l -= sum_j (s G_l)[j], with s_j = tau_{K-1} lr_j; X_l^T is read in place
    T* scaled_g = ws.scratch_b.data();  // [K x width]
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < width; ++c) scaled_g[j * width + c] = ws.update_scale[j] * g[j * width + c];
    gemm<T>(in, width, k, xk_l, 1, in, scaled_g, width, view.weights[l], width, T(-1), true);
    if (bias)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < width; ++c) bias[c] -= scaled_g[j * width + c];
    if (l + 1 < view.layers) activate<T>(view.activations[l], k * width, zq, ws.query_in[l + 1].data());
  }
}

// ---- output: xq + LN(z), per token of the mini-batch starting at token start
template <typename T>
static inline void write_outputs(const PairView<T>& view, int64_t k, int64_t start, int64_t out_token_stride,
                                 Workspace<T>& ws) {
  const int64_t f = view.dims[0], out_features = view.dims[view.layers];
  const T* z = ws.query_pre[view.layers - 1].data();
  for (int64_t i = 0; i < k; ++i)
    write_output_row(view, z + i * out_features, &ws.query_in[0][i * f], view.out + (start + i) * out_token_stride);
}

template <typename T>
void run_pair(const InnerloopStackArgs& args, int64_t pair, Workspace<T>& ws) {
  const PairView<T> view = make_pair_view<T>(args, pair);
  const int64_t k = args.mini_batch;
  for (int64_t start = 0; start < args.tokens; start += k) {
    gather_mini_batch(args, view, start, ws);
    key_side_forward(view, k, ws);
    layer_norm_gradient(view, k, ws);
    backpropagate_stack(view, k, ws);
    query_side_and_update(view, k, static_cast<const T*>(args.tau), ws);
    write_outputs(view, k, start, args.out_strides[2], ws);
  }
}

// Runs work(first, last) on contiguous ranges of the (batch, head) pairs, one range per thread. With
// OpenMP, the threads are the caller's OpenMP pool: inside torch that is torch's own, so the kernel
// does not compete with torch's idle workers for the cores. Without OpenMP the pragma is ignored and
// one thread runs. Returns 3 if any range threw (e.g. out of memory), else 0.
template <typename Work>
int parallel_over_pairs(int64_t pairs, int32_t num_threads, Work work) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, pairs)));
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    int rank = 0, size = 1;
#ifdef _OPENMP
    rank = omp_get_thread_num();
    size = omp_get_num_threads();
#endif
    try {
      work(pairs * rank / size, pairs * (rank + 1) / size);
    } catch (...) {
      failed = 1;
    }
  }
  return failed ? 3 : 0;
}

// run(T{}) with T the call's element type (float32 or float64); the entry points' status: run's, 1 for
// another dtype, 3 for a C++ exception (e.g. out of memory).
template <typename Run>
int by_dtype(int32_t dtype, Run run) {
  try {
    if (dtype == kFloat32) return run(float{});
    if (dtype == kFloat64) return run(double{});
  } catch (const std::exception&) {
    return 3;
  }
  return 1;
}

template <typename T>
int run(const InnerloopStackArgs& args) {
  return parallel_over_pairs(args.batch * args.heads, args.num_threads, [&](int64_t first, int64_t last) {
    Workspace<T> ws(args.num_layers, args.dims, args.mini_batch);
    for (int64_t pair = first; pair < last; ++pair) run_pair<T>(args, pair, ws);
  });
}

// ---------------------------------------------------------------------------------------------
// Decoding: one token of one (batch, head) pair
// ---------------------------------------------------------------------------------------------

// The pending sums of one pair while it decodes: the shapes of its weights and biases (null where none).
template <typename T>
struct PendingView {
  T* weights[kMaxLayers];
  T* biases[kMaxLayers];
};

template <typename T>
PendingView<T> make_pending_view(const InnerloopDecodeArgs& args, int64_t pair) {
  PendingView<T> pending;
  for (int32_t l = 0; l < args.num_layers; ++l) {
    const int64_t weight_size = args.dims[l] * args.dims[l + 1], width = args.dims[l + 1];
    pending.weights[l] = static_cast<T*>(args.pending_weights[l]) + pair * weight_size;
    pending.biases[l] = args.biases[l] ? static_cast<T*>(args.pending_biases[l]) + pair * width : nullptr;
  }
  return pending;
}

// ---- key side at the mini-batch's starting weights (row vectors: z = x W + b, row by row of W)
template <typename T>
static inline void decode_key_side(const PairView<T>& view, Workspace<T>& ws) {
  std::memcpy(ws.key_in[0].data(), view.xk, view.dims[0] * sizeof(T));
  for (int32_t l = 0; l < view.layers; ++l) {
    const int64_t in = view.dims[l], width = view.dims[l + 1];
    T* z = ws.key_pre[l].data();
    for (int64_t c = 0; c < width; ++c) z[c] = view.biases[l] ? view.biases[l][c] : T(0);
    for (int64_t p = 0; p < in; ++p) {
      const T x_p = ws.key_in[l][p];
      const T* w_row = view.weights[l] + p * width;
      for (int64_t c = 0; c < width; ++c) z[c] += x_p * w_row[c];
    }
    if (l + 1 < view.layers) activate<T>(view.activations[l], width, z, ws.key_in[l + 1].data());
  }
}

// ---- the inner gradient through the LayerNorm, then back through the stack. The LayerNorm step
// divides by the width where the scan multiplies by its inverse (as before the split: the two differ
// in the last bit, and each path is tested against the reference as it is).
template <typename T>
static inline void decode_inner_gradient(const PairView<T>& view, Workspace<T>& ws) {
  const int64_t out_features = view.dims[view.layers];
  const T* z = ws.key_pre[view.layers - 1].data();
  T* g = ws.grad[view.layers - 1].data();
  T mean, rstd, sum_g, sum_gx;
  row_moments(out_features, z, view.eps, &mean, &rstd);
  ln_target_gradient_row(out_features, z, mean, rstd, view.gamma, view.beta, view.xv, view.xk, g, &sum_g, &sum_gx);
  for (int64_t c = 0; c < out_features; ++c)
    g[c] = rstd * (g[c] - sum_g / T(out_features) - (z[c] - mean) * rstd * sum_gx / T(out_features));
  for (int32_t l = view.layers - 1; l > 0; --l) {
    const int64_t in = view.dims[l], width = view.dims[l + 1];
    const T* g_l = ws.grad[l].data();
    T* g_prev = ws.grad[l - 1].data();
    for (int64_t p = 0; p < in; ++p) {
      const T* w_row = view.weights[l] + p * width;
      g_prev[p] = sum_over<T>(width, [&](int64_t c) { return w_row[c] * g_l[c]; });
    }
    scale_by_derivative<T>(view.activations[l - 1], in, ws.key_pre[l - 1].data(), g_prev);
  }
}

// ---- layer l: add this token to the pending sums, and the query through W_b - tau_i * pending
template <typename T>
static inline void decode_query_layer(const PairView<T>& view, const PendingView<T>& pending, int32_t l, T lr,
                                      T tau, Workspace<T>& ws) {
  const int64_t in = view.dims[l], width = view.dims[l + 1];
  const T* g = ws.grad[l].data();
  const T* x = ws.key_in[l].data();
  const T* x_q = ws.query_in[l].data();
  T* zq = ws.query_pre[l].data();
  for (int64_t c = 0; c < width; ++c) {
    if (view.biases[l]) {
      pending.biases[l][c] += lr * g[c];
      zq[c] = view.biases[l][c] - tau * pending.biases[l][c];
    } else {
      zq[c] = T(0);
    }
  }
  for (int64_t p = 0; p < in; ++p) {
    T* s_row = pending.weights[l] + p * width;
    const T* w_row = view.weights[l] + p * width;
    const T lr_x = lr * x[p], xq_p = x_q[p];
    for (int64_t c = 0; c < width; ++c) {
      s_row[c] += lr_x * g[c];
      zq[c] += xq_p * (w_row[c] - tau * s_row[c]);
    }
  }
}

// ---- a token that closes its mini-batch commits W_b - tau_i * pending and zeroes pending
template <typename T>
static inline void commit_pending(const PairView<T>& view, const PendingView<T>& pending, int32_t l, T tau) {
  const int64_t in = view.dims[l], width = view.dims[l + 1];
  for (int64_t i = 0; i < in * width; ++i) {
    view.weights[l][i] -= tau * pending.weights[l][i];
    pending.weights[l][i] = T(0);
  }
  if (view.biases[l])
    for (int64_t c = 0; c < width; ++c) {
      view.biases[l][c] -= tau * pending.biases[l][c];
      pending.biases[l][c] = T(0);
    }
}

template <typename T>
void decode_pair(const InnerloopDecodeArgs& args, int64_t pair, Workspace<T>& ws) {
  const PairView<T> view = make_pair_view<T>(args, pair);
  const PendingView<T> pending = make_pending_view<T>(args, pair);
  const T lr = view.lr[0], tau = T(args.tau);
  decode_key_side(view, ws);
  decode_inner_gradient(view, ws);
  std::memcpy(ws.query_in[0].data(), view.xq, view.dims[0] * sizeof(T));
  for (int32_t l = 0; l < view.layers; ++l) {
    decode_query_layer(view, pending, l, lr, tau, ws);
    if (args.is_last) commit_pending(view, pending, l, tau);
    const int64_t width = view.dims[l + 1];
    if (l + 1 < view.layers) activate<T>(view.activations[l], width, ws.query_pre[l].data(), ws.query_in[l + 1].data());
  }
  // ---- output: xq + LN(z)
  write_output_row(view, ws.query_pre[view.layers - 1].data(), view.xq, view.out);
}

template <typename T>
int decode(const InnerloopDecodeArgs& args) {
  return parallel_over_pairs(args.batch * args.heads, args.num_threads, [&](int64_t first, int64_t last) {
    Workspace<T> ws(args.num_layers, args.dims, 1);
    for (int64_t pair = first; pair < last; ++pair) decode_pair<T>(args, pair, ws);
  });
}


// ---------------------------------------------------------------------------------------------
// Training TTT-Linear: the scan of a one-layer stack on the fused torch path's hoisted inputs, with
// its backward. The forward keeps the weights at the start of every mini-batch; the backward walks
// the mini-batches last to first, recomputes each one's key side from its starting weights and
// carries d loss / d weights from one mini-batch to the one before (README.md derives it).
// ---------------------------------------------------------------------------------------------

// The inner gradient through the LayerNorm, per key row of z [K x f] (the reconstruction loss's
// d loss / d xhat is a = shift + gamma^2 xhat): xhat, rstd, a, c = mean(a xhat) and the gradient
// G = rstd (a - mean(a) - xhat c), kept for the backward (ln_gradient_rows_backward).
template <typename T>
struct LayerNormRows {
  T *xhat, *a, *grad, *rstd, *c;  // [K x f], [K x f], [K x f], [K], [K]
};

template <typename T>
struct LinearScanWorkspace {
  std::vector<T> z_both, xhat, a, grad, rstd, c, products, grad_products, grad_g, g_t, w_t, grad_z_both;
  LinearScanWorkspace(int64_t k, int64_t in, int64_t f)
      : z_both(2 * k * f), xhat(k * f), a(k * f), grad(k * f), rstd(k), c(k), products((k + in) * f),
        grad_products((k + in) * f), grad_g(k * f), g_t(f * k), w_t(f * in), grad_z_both(2 * k * f) {}
  LayerNormRows<T> rows() { return {xhat.data(), a.data(), grad.data(), rstd.data(), c.data()}; }
};

// One pair's slice of a call's tensors for mini-batch n.
template <typename T>
struct LinearBlock {
  const T *both, *left, *shift;  // [2K x in], [(K + in) x K], [K x f]
  int64_t index;                 // n * pairs + pair: the block's position in every [NB, P, ...] tensor
};

template <typename T>
static inline LinearBlock<T> linear_block(const InnerloopLinearScanArgs& args, int64_t n, int64_t pair) {
  const int64_t k = args.mini_batch, in = args.in, f = args.width, index = n * args.pairs + pair;
  return {static_cast<const T*>(args.both) + index * 2 * k * in,
          static_cast<const T*>(args.left) + index * (k + in) * k,
          static_cast<const T*>(args.shift) + index * k * f, index};
}

// The rows of LayerNormRows from the key pre-activations z.
template <typename T>
static inline void ln_gradient_rows(int64_t k, int64_t f, const T* z, const T* shift, const T* gamma_sq, T eps,
                                    const LayerNormRows<T>& rows) {
  const T inv_f = T(1) / T(f);
  for (int64_t i = 0; i < k; ++i) {
    const T* z_row = z + i * f;
    const T* shift_row = shift + i * f;
    T *x = rows.xhat + i * f, *a = rows.a + i * f, *g = rows.grad + i * f;
    T mean, rstd;
    row_moments(f, z_row, eps, &mean, &rstd);
    for (int64_t col = 0; col < f; ++col) {
      x[col] = (z_row[col] - mean) * rstd;
      a[col] = shift_row[col] + gamma_sq[col] * x[col];
    }
    const T mean_a = sum_over<T>(f, [&](int64_t col) { return a[col]; }) * inv_f;
    const T c = sum_over<T>(f, [&](int64_t col) { return a[col] * x[col]; }) * inv_f;
    for (int64_t col = 0; col < f; ++col) g[col] = rstd * (a[col] - mean_a - x[col] * c);
    rows.rstd[i] = rstd;
    rows.c[i] = c;
  }
}

// d G (grad_g) -> d shift (= d a, written), d gamma^2 (accumulated) and d Z (written to grad_z), row by
// row: with d = dG, u = d - mean(d) - xhat mean(d xhat): d a = rstd u; d xhat = rstd (gamma^2 u - c d -
// a mean(d xhat)); and d Z = rstd (d xhat - mean(d xhat) - xhat mean(d xhat xhat)) - rstd^2 / f
// (d . P(a)) xhat, where P(a) = G / rstd.
template <typename T>
static inline void ln_gradient_rows_backward(int64_t k, int64_t f, const LayerNormRows<T>& rows, const T* grad_g,
                                             const T* gamma_sq, T* grad_shift, T* grad_gamma_sq, T* grad_z) {
  const T inv_f = T(1) / T(f);
  for (int64_t i = 0; i < k; ++i) {
    const T *d = grad_g + i * f, *x = rows.xhat + i * f, *a = rows.a + i * f, *g = rows.grad + i * f;
    const T r = rows.rstd[i], c = rows.c[i];
    const T mean_d = sum_over<T>(f, [&](int64_t col) { return d[col]; }) * inv_f;
    const T mean_dx = sum_over<T>(f, [&](int64_t col) { return d[col] * x[col]; }) * inv_f;
    const T sum_dg = sum_over<T>(f, [&](int64_t col) { return d[col] * g[col]; });  // rstd (d . P(a))
    T* dz = grad_z + i * f;  // d xhat first, then d Z
    T* ds = grad_shift + i * f;
    for (int64_t col = 0; col < f; ++col) {
      const T u = d[col] - mean_d - x[col] * mean_dx;
      ds[col] = r * u;
      grad_gamma_sq[col] += r * u * x[col];
      dz[col] = r * (gamma_sq[col] * u - c * d[col] - a[col] * mean_dx);
    }
    const T mean_h = sum_over<T>(f, [&](int64_t col) { return dz[col]; }) * inv_f;
    const T mean_hx = sum_over<T>(f, [&](int64_t col) { return dz[col] * x[col]; }) * inv_f;
    const T along_x = r * sum_dg * inv_f;  // not r * r first: on a scaled row r * r underflows
    for (int64_t col = 0; col < f; ++col) dz[col] = r * (dz[col] - mean_h - x[col] * mean_hx) - along_x * x[col];
  }
}

// The key side at weights w: Z = [X_k; X_q] w (the key rows only when queries is false), then the
// LayerNorm rows of its key rows (ln_gradient_rows).
template <typename T>
static inline void linear_key_side(const InnerloopLinearScanArgs& args, const LinearBlock<T>& block, const T* w,
                                   const T* gamma_sq, bool queries, LinearScanWorkspace<T>& ws) {
  const int64_t k = args.mini_batch, in = args.in, f = args.width;
  gemm<T>(queries ? 2 * k : k, f, in, block.both, in, 1, w, f, ws.z_both.data(), f, T(1), false);
  ln_gradient_rows(k, f, ws.z_both.data(), block.shift, gamma_sq, T(args.eps), ws.rows());
}

template <typename T>
void linear_scan_forward_pair(const InnerloopLinearScanArgs& args, int64_t pair, LinearScanWorkspace<T>& ws) {
  const int64_t k = args.mini_batch, in = args.in, f = args.width;
  T* w = static_cast<T*>(args.weight) + pair * in * f;
  const T* gamma_sq = static_cast<const T*>(args.gamma_sq) + pair * f;
  for (int64_t n = 0; n < args.num_mini_batches; ++n) {
    const LinearBlock<T> block = linear_block<T>(args, n, pair);
    std::memcpy(static_cast<T*>(args.starts) + block.index * in * f, w, in * f * sizeof(T));
    linear_key_side(args, block, w, gamma_sq, true, ws);
    // [output correction; weight step] = left G
    gemm<T>(k + in, f, k, block.left, k, 1, ws.grad.data(), f, ws.products.data(), f, T(1), false);
    T* z = static_cast<T*>(args.z) + (pair * args.num_mini_batches + n) * k * f;
    for (int64_t i = 0; i < k * f; ++i) z[i] = ws.z_both[k * f + i] - ws.products[i];
    for (int64_t i = 0; i < in * f; ++i) w[i] -= ws.products[k * f + i];
  }
}

template <typename T>
void linear_scan_backward_pair(const InnerloopLinearScanArgs& args, int64_t pair, LinearScanWorkspace<T>& ws) {
  const int64_t k = args.mini_batch, in = args.in, f = args.width;
  const T* gamma_sq = static_cast<const T*>(args.gamma_sq) + pair * f;
  T* grad_w = static_cast<T*>(args.grad_weight) + pair * in * f;  // d loss / d W_{n+1}, then W_n
  LongSum<T> grad_gamma_sq(static_cast<T*>(args.grad_gamma_sq) + pair * f, f);
  for (int64_t n = args.num_mini_batches - 1; n >= 0; --n) {
    const LinearBlock<T> block = linear_block<T>(args, n, pair);
    const T* w = static_cast<const T*>(args.starts) + block.index * in * f;
    const T* grad_z = static_cast<const T*>(args.grad_z) + (pair * args.num_mini_batches + n) * k * f;
    linear_key_side(args, block, w, gamma_sq, false, ws);
    // the products' gradient: z = Z_q - products[:K], W_{n+1} = W_n - products[K:]
    T* grad_products = ws.grad_products.data();
    for (int64_t i = 0; i < k * f; ++i) grad_products[i] = -grad_z[i];
    for (int64_t i = 0; i < in * f; ++i) grad_products[k * f + i] = -grad_w[i];
    // d left = d products G^T, d G = left^T d products
    transpose<T>(k, f, ws.grad.data(), ws.g_t.data());
    T* grad_left = static_cast<T*>(args.grad_left) + block.index * (k + in) * k;
    gemm<T>(k + in, k, f, grad_products, f, 1, ws.g_t.data(), k, grad_left, k, T(1), false);
    gemm<T>(k, f, k + in, block.left, 1, k, grad_products, f, ws.grad_g.data(), f, T(1), false);
    T* grad_shift = static_cast<T*>(args.grad_shift) + block.index * k * f;
    ln_gradient_rows_backward(k, f, ws.rows(), ws.grad_g.data(), gamma_sq, grad_shift, grad_gamma_sq.start_block(),
                              ws.grad_z_both.data());  // d Z_k into grad_z_both[:K]
    grad_gamma_sq.end_block();
    std::memcpy(&ws.grad_z_both[k * f], grad_z, k * f * sizeof(T));     // d Z_q = d z
    // d both = d Z W^T; d W_n = d W_{n+1} + both^T d Z
    transpose<T>(in, f, w, ws.w_t.data());
    T* grad_both = static_cast<T*>(args.grad_both) + block.index * 2 * k * in;
    gemm<T>(2 * k, in, f, ws.grad_z_both.data(), f, 1, ws.w_t.data(), in, grad_both, in, T(1), false);
    gemm<T>(in, f, 2 * k, block.both, 1, in, ws.grad_z_both.data(), f, grad_w, f, T(1), true);
  }
  grad_gamma_sq.write();
}

template <typename T>
int linear_scan(const InnerloopLinearScanArgs& args, bool backward) {
  return parallel_over_pairs(args.pairs, args.num_threads, [&](int64_t first, int64_t last) {
    LinearScanWorkspace<T> ws(args.mini_batch, args.in, args.width);
    for (int64_t pair = first; pair < last; ++pair) {
      if (backward)
        linear_scan_backward_pair<T>(args, pair, ws);
      else
        linear_scan_forward_pair<T>(args, pair, ws);
    }
  });
}

// The training scans write the weights at every mini-batch's start into a buffer torch has just
// allocated (hundreds of MB for TTT-MLP at T = 2048), whose first touch costs a page fault per 4 KiB
// page: as long as writing it. Where Linux has transparent huge pages in `madvise` mode, asking for them
// on the buffer's whole 2 MiB pages cuts that cost to about a third (measured). A hint only: where it
// is refused or unknown, nothing changes.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  if (bytes < int64_t(4 * kHugePage)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int linear_scan_entry(const InnerloopLinearScanArgs* args, bool backward) {
  if (args->num_mini_batches < 0 || args->pairs < 0 || args->mini_batch < 1 || args->in < 1 || args->width < 1)
    return 2;
  const int64_t element = args->dtype == kFloat64 ? 8 : 4;
  if (!backward)
    advise_huge_pages(args->starts, args->num_mini_batches * args->pairs * args->in * args->width * element);
  return by_dtype(args->dtype, [&](auto zero) { return linear_scan<decltype(zero)>(*args, backward); });
}


// ---------------------------------------------------------------------------------------------
// Training deeper stacks (TTT-MLP): the same scheme for L >= 2 affine layers, the activation between
// them the identity or tanh-GELU. Layer 0 runs as in the one-layer scan (its left matrix is hoisted);
// each later layer l builds its own from its key inputs X_l and query inputs Xq_l, which depend on the
// weights: mix_l = eta * (Xq_l X_l^T). The forward keeps each mini-batch's products (a record); the
// backward restores a mini-batch from its record and its starting weights, then goes back through the query side (last layer first), the chain G_{l-1} = (G_l W_l^T) * act'(Z_{l-1}),
// the LayerNorm and the key side (README.md derives it).
// ---------------------------------------------------------------------------------------------

// out (+)= grad * slope elementwise over a [rows x cols] block whose rows are ld_grad apart in grad (the
// ones column of a layer with a bias is skipped); slope and out contiguous.
template <typename T>
void times_slope(int64_t rows, int64_t cols, const T* grad, int64_t ld_grad, const T* slope, T* out, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* g = grad + i * ld_grad;
    const T* d = slope + i * cols;
    T* o = out + i * cols;
    if (accumulate)
      for (int64_t c = 0; c < cols; ++c) o[c] += g[c] * d[c];
    else
      for (int64_t c = 0; c < cols; ++c) o[c] = g[c] * d[c];
  }
}

// One GELU pass over a [rows x cols] block of pre-activations: the layer's inputs dst [rows x (cols + ones)]
// = [act(pre), 1], slope = act'(pre) (gelu_tanh_derivative) and, where curve is not null, curve =
// act''(pre): the reference's derivative polynomial differentiated as written, with its clamp to
// [-100, 100] (zero beyond), which is what autograd takes through it (the identity: ones and zeros).
// In float32 one tanh serves all three: the forward's constant 0.7978845608028654 and the derivative
// polynomial's truncated 0.79788456 are the same float, and tanh's argument is taken as the forward takes
// it (its rounding differs from the polynomial's by an ulp: within float32's error), so act(pre) is
// gelu_tanh's value and a mini-batch's hidden element costs the backward two tanh instead of five
// (key and query rows), the forward two instead of three. float64, the precision reference, keeps the
// derivative's own tanh as written.
template <typename T>
void activate_with_slopes(int32_t activation, int64_t rows, int64_t cols, bool ones, const T* pre, T* dst, T* slope,
                          T* curve) {
  const int64_t ld = cols + (ones ? 1 : 0), count = rows * cols;
  if (activation != kGeluTanh) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ld, pre + i * cols, cols * sizeof(T));
    std::fill(slope, slope + count, T(1));
    if (curve != nullptr) std::fill(curve, curve + count, T(0));
  } else {
    const T c = T(0.79788456), c3 = T(0.1070322243);
    for (int64_t i = 0; i < rows; ++i) {
      const T* z = pre + i * cols;
      T* out = dst + i * ld;
      T* d1 = slope + i * cols;
      T* d2 = curve == nullptr ? nullptr : curve + i * cols;
      for (int64_t col = 0; col < cols; ++col) {
        const T raw = z[col];
        const T x = std::min(std::max(raw, T(-100)), T(100));  // the derivative's clamp
        const T x2 = x * x;
        T t, t_act;
        if constexpr (std::is_same<T, float>::value) {
          t = t_act = tanh_of(T(0.7978845608028654) * (raw + T(0.044715) * raw * raw * raw));
        } else {
          t = tanh_of(c * x * (T(1) + T(0.044715) * x2));
          t_act = tanh_of(T(0.7978845608028654) * (raw + T(0.044715) * raw * raw * raw));
        }
        out[col] = T(0.5) * raw * (T(1) + t_act);
        const T sech2 = T(1) - t * t, p = c + c3 * x2;
        d1[col] = T(0.5) * x * (sech2 * p) + T(0.5) * (T(1) + t);
        if (d2 != nullptr) {
          const T dt = sech2 * c * (T(1) + T(3) * T(0.044715) * x2);
          const T second = T(0.5) * (sech2 * p + dt) + T(0.5) * x * (sech2 * T(2) * c3 * x - T(2) * t * dt * p);
          d2[col] = raw < T(-100) || raw > T(100) ? T(0) : second;
        }
      }
    }
  }
  if (ones)
    for (int64_t i = 0; i < rows; ++i) dst[i * ld + cols] = T(1);
}

// dst [rows x (cols + ones)] = [act(src), 1]: a layer's inputs from the previous layer's pre-activations.
template <typename T>
void layer_inputs(int32_t activation, int64_t rows, int64_t cols, bool ones, const T* src, T* dst) {
  const int64_t ld = cols + (ones ? 1 : 0);
  for (int64_t i = 0; i < rows; ++i) {
    activate<T>(activation, cols, src + i * cols, dst + i * ld);
    if (ones) dst[i * ld + cols] = T(1);
  }
}

template <typename T>
struct StackScanWorkspace {
  // Per layer l (in_l x out_l weights): key inputs X_l [K x in_l] (l >= 1; X_0 is read from `both`),
  // key pre-activations Z_l [K x out_l] (l = 0: [2K x out_0], the query rows after the key rows), the
  // inner gradients G_l [K x out_l], back_l = G_l W_l^T [K x out_{l-1}] (l >= 1), query inputs
  // Xq_l [K x in_l] (l >= 1), query pre-activations [K x out_l], S_l = Xq_l X_l^T and mix_l = eta * S_l
  // [K x K] (l >= 1), act' of the key and query pre-activations (l < L - 1); and for the backward the
  // gradients of each of them.
  std::vector<std::vector<T>> key_in, key_pre, grad, back, query_in, query_pre, sim, mix, key_slope, query_slope,
      key_curve;
  std::vector<std::vector<T>> d_key_in, d_key_pre, d_grad, d_query_in, d_query_pre;
  std::vector<T> xhat, a, rstd, c, products, d_products, d_mix, transposed, product_t, scaled;

  StackScanWorkspace(int32_t layers, const int64_t* in, const int64_t* out, int64_t k) {
    for (auto* list : {&key_in, &key_pre, &grad, &back, &query_in, &query_pre, &sim, &mix, &key_slope, &query_slope,
                       &key_curve, &d_key_in, &d_key_pre, &d_grad, &d_query_in, &d_query_pre})
      list->resize(layers);
    int64_t widest = 0;
    for (int32_t l = 0; l < layers; ++l) {
      widest = std::max({widest, in[l], out[l]});
      key_pre[l].resize((l == 0 ? 2 : 1) * k * out[l]);
      for (auto* list : {&grad, &query_pre, &d_key_pre, &d_grad, &d_query_pre}) (*list)[l].resize(k * out[l]);
      if (l + 1 < layers)
        for (auto* list : {&key_slope, &query_slope, &key_curve}) (*list)[l].resize(k * out[l]);
      if (l == 0) continue;
      for (auto* list : {&key_in, &query_in, &d_key_in, &d_query_in}) (*list)[l].resize(k * in[l]);
      back[l].resize(k * out[l - 1]);
      sim[l].resize(k * k);
      mix[l].resize(k * k);
    }
    const int64_t f = out[layers - 1];
    for (auto* buffer : {&xhat, &a}) buffer->resize(k * f);
    rstd.resize(k);
    c.resize(k);
    products.resize((k + in[0]) * out[0]);
    d_products.resize(std::max(k + in[0], 2 * k) * out[0]);  // also d [Z_0; Zq_0]
    d_mix.resize(k * k);
    transposed.resize(std::max(widest * widest, 2 * k * widest));  // a transposed W_0 or a small matrix
    product_t.resize(2 * k * widest);
    scaled.resize(k * widest);
  }
  // the LayerNorm rows of the last layer, whose gradient G_{L-1} they write in place
  LayerNormRows<T> rows() { return {xhat.data(), a.data(), grad.back().data(), rstd.data(), c.data()}; }
};

// One pair's slice of a call's tensors for mini-batch n.
template <typename T>
struct StackBlock {
  const T *both, *left, *shift, *eta, *scale;  // [2K x in_0], [(K + in_0) x K], [K x f], [K x K], [K]
  int64_t index;                               // n * pairs + pair
  int64_t z_index;                             // pair * NB + n: z and grad_z are [P, NB, K, f]
};

template <typename T>
static inline StackBlock<T> stack_block(const InnerloopStackScanArgs& args, int64_t n, int64_t pair) {
  const int64_t k = args.mini_batch, in0 = args.in_dims[0], f = args.out_dims[args.num_layers - 1];
  const int64_t index = n * args.pairs + pair;
  return {static_cast<const T*>(args.both) + index * 2 * k * in0,
          static_cast<const T*>(args.left) + index * (k + in0) * k,
          static_cast<const T*>(args.shift) + index * k * f,
          static_cast<const T*>(args.eta) + index * k * k,
          static_cast<const T*>(args.scale) + index * k,
          index,
          pair * args.num_mini_batches + n};
}

// out (+)= scale * A B^T for A [m x depth] and B [n x depth] row-major, out [m x n]: B is transposed
// into the workspace first (B is always small here: K rows).
template <typename T>
void gemm_with_b_transposed(int64_t m, int64_t n, int64_t depth, const T* a, const T* b, T* out, T scale,
                            bool accumulate, T* scratch) {
  transpose<T>(n, depth, b, scratch);  // [depth x n]
  gemm<T>(m, n, depth, a, depth, 1, scratch, n, out, n, scale, accumulate);
}

// out [K x cols] (+)= scale * D W^T for D [K x width] and W [cols (of rows_w) x width], without transposing
// the large W: computed as (W D^T)^T, W read in place. ws.transposed and ws.product_t are its scratch.
template <typename T>
void times_weight_transposed(int64_t k, int64_t cols, int64_t width, const T* d, const T* w, T* out, T scale,
                             bool accumulate, StackScanWorkspace<T>& ws) {
  transpose<T>(k, width, d, ws.transposed.data());  // D^T [width x K]
  gemm<T>(cols, k, width, w, width, 1, ws.transposed.data(), k, ws.product_t.data(), k, T(1), false);
  transpose_scaled_into<T>(k, cols, ws.product_t.data(), out, scale, accumulate);
}

// One mini-batch at weights w[l]: every intermediate into the workspace, the outputs into z and the
// weights moved past the mini-batch in place.
template <typename T>
void stack_scan_block(const InnerloopStackScanArgs& args, const StackBlock<T>& block, T* const* w, const T* gamma_sq,
                      StackScanWorkspace<T>& ws) {
  const int32_t layers = args.num_layers;
  const int64_t k = args.mini_batch, f = args.out_dims[layers - 1];
  const int64_t* in = args.in_dims;
  const int64_t* out = args.out_dims;
  // key side (layer 0 with the queries), then the inner gradient through the LayerNorm
  gemm<T>(2 * k, out[0], in[0], block.both, in[0], 1, w[0], out[0], ws.key_pre[0].data(), out[0], T(1), false);
  for (int32_t l = 1; l < layers; ++l) {
    activate_with_slopes<T>(args.activations[l - 1], k, out[l - 1], args.has_bias[l], ws.key_pre[l - 1].data(),
                            ws.key_in[l].data(), ws.key_slope[l - 1].data(), nullptr);
    gemm<T>(k, out[l], in[l], ws.key_in[l].data(), in[l], 1, w[l], out[l], ws.key_pre[l].data(), out[l], T(1), false);
  }
  ln_gradient_rows(k, f, ws.key_pre[layers - 1].data(), block.shift, gamma_sq, T(args.eps), ws.rows());
  // back through the stack at the starting weights: G_{l-1} = (G_l W_l^T) * act'(Z_{l-1})
  for (int32_t l = layers - 1; l > 0; --l) {
    times_weight_transposed<T>(k, out[l - 1], out[l], ws.grad[l].data(), w[l], ws.back[l].data(), T(1), false, ws);
    times_slope<T>(k, out[l - 1], ws.back[l].data(), out[l - 1], ws.key_slope[l - 1].data(), ws.grad[l - 1].data(),
                   false);
  }
  // query side: layer 0 through the hoisted left matrix, [correction; weight step] = left G_0
  gemm<T>(k + in[0], out[0], k, block.left, k, 1, ws.grad[0].data(), out[0], ws.products.data(), out[0], T(1), false);
  for (int64_t i = 0; i < k * out[0]; ++i) ws.query_pre[0][i] = ws.key_pre[0][k * out[0] + i] - ws.products[i];
  for (int64_t i = 0; i < in[0] * out[0]; ++i) w[0][i] -= ws.products[k * out[0] + i];
  for (int32_t l = 1; l < layers; ++l) {
    T* xq = ws.query_in[l].data();
    const T* x = ws.key_in[l].data();
    const T* g = ws.grad[l].data();
    layer_inputs<T>(args.activations[l - 1], k, out[l - 1], args.has_bias[l], ws.query_pre[l - 1].data(), xq);
    gemm_with_b_transposed<T>(k, k, in[l], xq, x, ws.sim[l].data(), T(1), false, ws.transposed.data());
    for (int64_t i = 0; i < k * k; ++i) ws.mix[l][i] = block.eta[i] * ws.sim[l][i];
    T* zq = ws.query_pre[l].data();
    gemm<T>(k, out[l], in[l], xq, in[l], 1, w[l], out[l], zq, out[l], T(1), false);
    gemm<T>(k, out[l], k, ws.mix[l].data(), k, 1, g, out[l], zq, out[l], T(-1), true);
    // W_l -= X_l^T (s G_l), X_l^T read in place
    for (int64_t j = 0; j < k; ++j)
      for (int64_t col = 0; col < out[l]; ++col) ws.scaled[j * out[l] + col] = block.scale[j] * g[j * out[l] + col];
    gemm<T>(in[l], out[l], k, x, 1, in[l], ws.scaled.data(), out[l], w[l], out[l], T(-1), true);
  }
  T* z = static_cast<T*>(args.z) + block.z_index * k * f;
  std::memcpy(z, ws.query_pre[layers - 1].data(), k * f * sizeof(T));
}

// What the forward keeps of a mini-batch for the backward, in this order: per layer l, the key
// pre-activations Z_l [K x out_l], for l < L - 1 the query pre-activations zq_l [K x out_l], for l >= 1
// back_l = G_l W_l^T [K x out_{l-1}] and S_l = Xq_l X_l^T [K x K]. These are the products; everything
// else the backward reads (the layers' inputs, act', the LayerNorm rows, G_l, mix_l) is elementwise
// from them. visit(part, count) is called on each part's place in the workspace.
template <typename T, typename Visit>
void visit_record(int32_t layers, int64_t k, const int64_t* out, StackScanWorkspace<T>& ws, Visit visit) {
  for (int32_t l = 0; l < layers; ++l) {
    visit(ws.key_pre[l].data(), k * out[l]);  // for l = 0 the key rows only (the query rows follow them)
    if (l + 1 < layers) visit(ws.query_pre[l].data(), k * out[l]);
    if (l == 0) continue;
    visit(ws.back[l].data(), k * out[l - 1]);
    visit(ws.sim[l].data(), k * k);
  }
}

// The elements of one record (visit_record's parts added up).
int64_t stack_record_size(int32_t layers, int64_t k, const int64_t* out) {
  int64_t size = 0;
  for (int32_t l = 0; l < layers; ++l) size += k * out[l] * (l + 1 < layers ? 2 : 1) + (l > 0 ? k * (out[l - 1] + k) : 0);
  return size;
}

template <typename T>
static inline T* stack_record(const InnerloopStackScanArgs& args, int64_t index) {
  return static_cast<T*>(args.records) + index * args.record_size;
}

// The backward's workspace for one mini-batch from its record: the kept products copied back, then
// what follows from them elementwise (the layers' inputs, act' of the key rows, the LayerNorm rows and
// G_{L-1}, G_{l-1} = back_l * act'(Z_{l-1}), mix_l = eta * S_l), as the forward computed them.
template <typename T>
void restore_stack_block(const InnerloopStackScanArgs& args, const StackBlock<T>& block, const T* gamma_sq,
                         StackScanWorkspace<T>& ws) {
  const int32_t layers = args.num_layers;
  const int64_t k = args.mini_batch, f = args.out_dims[layers - 1];
  const int64_t* out = args.out_dims;
  const T* record = stack_record<T>(args, block.index);
  visit_record(layers, k, out, ws, [&](T* part, int64_t count) {
    std::memcpy(part, record, count * sizeof(T));
    record += count;
  });
  ln_gradient_rows(k, f, ws.key_pre[layers - 1].data(), block.shift, gamma_sq, T(args.eps), ws.rows());
  for (int32_t l = layers - 1; l > 0; --l) {
    const int32_t activation = args.activations[l - 1];
    activate_with_slopes<T>(activation, k, out[l - 1], args.has_bias[l], ws.key_pre[l - 1].data(), ws.key_in[l].data(),
                            ws.key_slope[l - 1].data(), ws.key_curve[l - 1].data());
    activate_with_slopes<T>(activation, k, out[l - 1], args.has_bias[l], ws.query_pre[l - 1].data(),
                            ws.query_in[l].data(), ws.query_slope[l - 1].data(), nullptr);
    times_slope<T>(k, out[l - 1], ws.back[l].data(), out[l - 1], ws.key_slope[l - 1].data(), ws.grad[l - 1].data(),
                   false);
    for (int64_t i = 0; i < k * k; ++i) ws.mix[l][i] = block.eta[i] * ws.sim[l][i];
  }
}

template <typename T>
void stack_scan_forward_pair(const InnerloopStackScanArgs& args, int64_t pair, StackScanWorkspace<T>& ws) {
  T* w[kMaxLayers];
  for (int32_t l = 0; l < args.num_layers; ++l)
    w[l] = static_cast<T*>(args.weights[l]) + pair * args.in_dims[l] * args.out_dims[l];
  const T* gamma_sq = static_cast<const T*>(args.gamma_sq) + pair * args.out_dims[args.num_layers - 1];
  for (int64_t n = 0; n < args.num_mini_batches; ++n) {
    const StackBlock<T> block = stack_block<T>(args, n, pair);
    for (int32_t l = 0; l < args.num_layers; ++l) {
      const int64_t size = args.in_dims[l] * args.out_dims[l];
      std::memcpy(static_cast<T*>(args.starts[l]) + block.index * size, w[l], size * sizeof(T));
    }
    stack_scan_block(args, block, w, gamma_sq, ws);
    T* record = stack_record<T>(args, block.index);
    visit_record(args.num_layers, args.mini_batch, args.out_dims, ws, [&](T* part, int64_t count) {
      std::memcpy(record, part, count * sizeof(T));
      record += count;
    });
  }
}

// The backward of one mini-batch, its intermediates restored in ws (restore_stack_block): grad_w[l] holds d loss / d W_l
// after the mini-batch on entry and at its start on exit; the inputs' gradients are written.
template <typename T>
void stack_scan_block_backward(const InnerloopStackScanArgs& args, const StackBlock<T>& block, T* const* w,
                               T* const* grad_w, const T* gamma_sq, T* grad_gamma_sq, StackScanWorkspace<T>& ws) {
  const int32_t layers = args.num_layers;
  const int64_t k = args.mini_batch, f = args.out_dims[layers - 1];
  const int64_t* in = args.in_dims;
  const int64_t* out = args.out_dims;
  const int64_t index = block.index;
  T* grad_eta = static_cast<T*>(args.grad_eta) + index * k * k;
  T* grad_scale = static_cast<T*>(args.grad_scale) + index * k;
  std::fill(grad_eta, grad_eta + k * k, T(0));
  std::fill(grad_scale, grad_scale + k, T(0));
  for (int32_t l = 0; l < layers; ++l) {
    std::fill(ws.d_grad[l].begin(), ws.d_grad[l].end(), T(0));
    std::fill(ws.d_key_pre[l].begin(), ws.d_key_pre[l].end(), T(0));
  }
  std::memcpy(ws.d_query_pre[layers - 1].data(), static_cast<const T*>(args.grad_z) + block.z_index * k * f,
              k * f * sizeof(T));

  // ---- the query side, last layer first: zq_l = Xq_l W_l - mix_l G_l and W_l' = W_l - X_l^T (s G_l)
  for (int32_t l = layers - 1; l > 0; --l) {
    const int64_t width = out[l], rows = in[l];
    const T *x = ws.key_in[l].data(), *xq = ws.query_in[l].data(), *g = ws.grad[l].data();
    const T* dzq = ws.d_query_pre[l].data();
    T *dx = ws.d_key_in[l].data(), *dxq = ws.d_query_in[l].data(), *dg = ws.d_grad[l].data();
    // through the weight step, with grad_w[l] = d W_l' still: d(sG) = -X dW', dX = -(sG) dW'^T
    T* d_scaled = ws.scaled.data();
    gemm<T>(k, width, rows, x, rows, 1, grad_w[l], width, d_scaled, width, T(-1), false);
    for (int64_t j = 0; j < k; ++j) {
      const T* g_row = g + j * width;
      const T* d_row = d_scaled + j * width;
      grad_scale[j] += sum_over<T>(width, [&](int64_t col) { return g_row[col] * d_row[col]; });
      for (int64_t col = 0; col < width; ++col) dg[j * width + col] += block.scale[j] * d_row[col];
    }
    for (int64_t j = 0; j < k; ++j)
      for (int64_t col = 0; col < width; ++col) d_scaled[j * width + col] = block.scale[j] * g[j * width + col];
    times_weight_transposed<T>(k, rows, width, d_scaled, grad_w[l], dx, T(-1), false, ws);
    // through the outputs: dW += Xq^T dzq, dXq = dzq W^T, d mix = -dzq G^T, dG -= mix^T dzq
    gemm<T>(rows, width, k, xq, 1, rows, dzq, width, grad_w[l], width, T(1), true);
    times_weight_transposed<T>(k, rows, width, dzq, w[l], dxq, T(1), false, ws);
    gemm_with_b_transposed<T>(k, k, width, dzq, g, ws.d_mix.data(), T(-1), false, ws.transposed.data());
    gemm<T>(k, width, k, ws.mix[l].data(), 1, k, dzq, width, dg, width, T(-1), true);
    // mix = eta * S, S = Xq X^T: d eta += d mix * S, dS = d mix * eta (into d_mix)
    for (int64_t i = 0; i < k * k; ++i) {
      grad_eta[i] += ws.d_mix[i] * ws.sim[l][i];
      ws.d_mix[i] *= block.eta[i];
    }
    gemm<T>(k, rows, k, ws.d_mix.data(), k, 1, x, rows, dxq, rows, T(1), true);
    gemm<T>(k, rows, k, ws.d_mix.data(), 1, k, xq, rows, dx, rows, T(1), true);
    // Xq_l = [act(zq_{l-1}), 1]
    times_slope<T>(k, out[l - 1], dxq, rows, ws.query_slope[l - 1].data(), ws.d_query_pre[l - 1].data(), false);
  }
  // ---- layer 0: zq_0 = Zq_0 - products[:K], W_0' = W_0 - products[K:], products = left G_0
  const int64_t in0 = in[0], out0 = out[0];
  T* d_products = ws.d_products.data();
  for (int64_t i = 0; i < k * out0; ++i) d_products[i] = -ws.d_query_pre[0][i];
  for (int64_t i = 0; i < in0 * out0; ++i) d_products[k * out0 + i] = -grad_w[0][i];
  T* grad_left = static_cast<T*>(args.grad_left) + index * (k + in0) * k;
  gemm_with_b_transposed<T>(k + in0, k, out0, d_products, ws.grad[0].data(), grad_left, T(1), false,
                            ws.transposed.data());
  gemm<T>(k, out0, k + in0, block.left, 1, k, d_products, out0, ws.d_grad[0].data(), out0, T(1), true);

  // ---- the chain G_{l-1} = back_l * act'(Z_{l-1}), back_l = G_l W_l^T, first layer first
  for (int32_t l = 1; l < layers; ++l) {
    const int64_t rows = out[l - 1], width = out[l];
    const T* curve = ws.key_curve[l - 1].data();
    const T* dg_prev = ws.d_grad[l - 1].data();
    T* d_back = ws.scaled.data();  // [K x rows]
    times_slope<T>(k, rows, dg_prev, rows, ws.key_slope[l - 1].data(), d_back, false);
    if (args.activations[l - 1] == kGeluTanh) {
      T* dz = ws.d_key_pre[l - 1].data();
      for (int64_t i = 0; i < k * rows; ++i) dz[i] += dg_prev[i] * ws.back[l][i] * curve[i];
    }
    gemm<T>(k, width, rows, d_back, rows, 1, w[l], width, ws.d_grad[l].data(), width, T(1), true);
    gemm<T>(rows, width, k, d_back, 1, rows, ws.grad[l].data(), width, grad_w[l], width, T(1), true);
  }
  // ---- the LayerNorm: d G_{L-1} -> d shift, d gamma^2, d Z_{L-1}
  T* grad_shift = static_cast<T*>(args.grad_shift) + index * k * f;
  ln_gradient_rows_backward(k, f, ws.rows(), ws.d_grad[layers - 1].data(), gamma_sq, grad_shift, grad_gamma_sq,
                            ws.d_key_pre[layers - 1].data());
  // ---- the key side, last layer first: Z_l = X_l W_l, X_l = [act(Z_{l-1}), 1]
  for (int32_t l = layers - 1; l > 0; --l) {
    const int64_t rows = in[l], width = out[l];
    const T* dz = ws.d_key_pre[l].data();
    times_weight_transposed<T>(k, rows, width, dz, w[l], ws.d_key_in[l].data(), T(1), true, ws);
    gemm<T>(rows, width, k, ws.key_in[l].data(), 1, rows, dz, width, grad_w[l], width, T(1), true);
    times_slope<T>(k, out[l - 1], ws.d_key_in[l].data(), rows, ws.key_slope[l - 1].data(), ws.d_key_pre[l - 1].data(),
                   true);
  }
  // ---- layer 0: [Z_0; Zq_0] = both W_0
  T* d_both_pre = ws.d_products.data();  // [2K x out_0], reused
  std::memcpy(d_both_pre, ws.d_key_pre[0].data(), k * out0 * sizeof(T));
  std::memcpy(d_both_pre + k * out0, ws.d_query_pre[0].data(), k * out0 * sizeof(T));
  T* grad_both = static_cast<T*>(args.grad_both) + index * 2 * k * in0;
  times_weight_transposed<T>(2 * k, in0, out0, d_both_pre, w[0], grad_both, T(1), false, ws);
  gemm<T>(in0, out0, 2 * k, block.both, 1, in0, d_both_pre, out0, grad_w[0], out0, T(1), true);
}

template <typename T>
void stack_scan_backward_pair(const InnerloopStackScanArgs& args, int64_t pair, StackScanWorkspace<T>& ws) {
  const int64_t f = args.out_dims[args.num_layers - 1];
  const T* gamma_sq = static_cast<const T*>(args.gamma_sq) + pair * f;
  LongSum<T> grad_gamma_sq(static_cast<T*>(args.grad_gamma_sq) + pair * f, f);
  T* grad_w[kMaxLayers];
  for (int32_t l = 0; l < args.num_layers; ++l)
    grad_w[l] = static_cast<T*>(args.grad_weights[l]) + pair * args.in_dims[l] * args.out_dims[l];
  for (int64_t n = args.num_mini_batches - 1; n >= 0; --n) {
    const StackBlock<T> block = stack_block<T>(args, n, pair);
    T* w[kMaxLayers];
    for (int32_t l = 0; l < args.num_layers; ++l)
      w[l] = static_cast<T*>(args.starts[l]) + block.index * args.in_dims[l] * args.out_dims[l];
    restore_stack_block(args, block, gamma_sq, ws);
    stack_scan_block_backward(args, block, w, grad_w, gamma_sq, grad_gamma_sq.start_block(), ws);
    grad_gamma_sq.end_block();
  }
  grad_gamma_sq.write();
}

template <typename T>
int stack_scan(const InnerloopStackScanArgs& args, bool backward) {
  return parallel_over_pairs(args.pairs, args.num_threads, [&](int64_t first, int64_t last) {
    StackScanWorkspace<T> ws(args.num_layers, args.in_dims, args.out_dims, args.mini_batch);
    for (int64_t pair = first; pair < last; ++pair) {
      if (backward)
        stack_scan_backward_pair<T>(args, pair, ws);
      else
        stack_scan_forward_pair<T>(args, pair, ws);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Training, around the scans: the hoisting (forward and backward) and the output LayerNorm with the
// residual (forward and backward), one (batch, head) pair per thread; README.md derives the backward.
// ---------------------------------------------------------------------------------------------

// A pair's rows of a strided [B, H, T, n] tensor (or [B, H, T] with n = 1): row t at base + t * strides[2].
template <typename T, typename Pointer>
static inline Pointer pair_rows(Pointer data, const int64_t* strides, int64_t pair, int64_t heads) {
  return data + (pair / heads) * strides[0] + (pair % heads) * strides[1];
}

// One mini-batch's hoisted inputs for the scans: keys and queries gathered (with their ones column),
// shift = gamma (beta - xv + xk), eta[i, j] = tau_i lr_j (j <= i), scale_j = tau_{K-1} lr_j, and left =
// [eta * (Q K^T + 1); (scale K)^T; scale] (the + 1 and the last row with a bias only).
template <typename T>
void hoist_block(const InnerloopHoistArgs& args, int64_t pair, int64_t n, T* sim) {
  const int64_t k = args.mini_batch, f = args.width, in = f + args.bias, heads = args.heads;
  const int64_t pairs = args.batch * heads, index = n * pairs + pair, h = pair % heads;
  const T* xq = pair_rows<T>(static_cast<const T*>(args.xq), args.xq_strides, pair, heads);
  const T* xk = pair_rows<T>(static_cast<const T*>(args.xk), args.xk_strides, pair, heads);
  const T* xv = pair_rows<T>(static_cast<const T*>(args.xv), args.xv_strides, pair, heads);
  const T* lr = pair_rows<T>(static_cast<const T*>(args.lr), args.lr_strides, pair, heads);
  const T* tau = static_cast<const T*>(args.tau);
  const T* gamma = static_cast<const T*>(args.ln_weight) + h * f;
  const T* beta = static_cast<const T*>(args.ln_bias) + h * f;
  T* both = static_cast<T*>(args.both) + index * 2 * k * in;
  T* left = static_cast<T*>(args.left) + index * (k + in) * k;
  T* shift = static_cast<T*>(args.shift) + index * k * f;
  T* eta = static_cast<T*>(args.eta) + index * k * k;
  T* scale = static_cast<T*>(args.scale) + index * k;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = n * k + i;
    const T* key = xk + t * args.xk_strides[2];
    const T* value = xv + t * args.xv_strides[2];
    std::memcpy(both + i * in, key, f * sizeof(T));
    std::memcpy(both + (k + i) * in, xq + t * args.xq_strides[2], f * sizeof(T));
    if (args.bias) both[i * in + f] = both[(k + i) * in + f] = T(1);
    for (int64_t c = 0; c < f; ++c) shift[i * f + c] = (beta[c] - value[c] + key[c]) * gamma[c];
  }
  for (int64_t j = 0; j < k; ++j) scale[j] = tau[k - 1] * lr[(n * k + j) * args.lr_strides[2]];
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) eta[i * k + j] = j <= i ? tau[i] * lr[(n * k + j) * args.lr_strides[2]] : T(0);
  // sim = Q K^T (+ 1): rows of both, dot products over the f key columns
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const T* q_row = both + (k + i) * in;
      const T* k_row = both + j * in;
      sim[i * k + j] = sum_over<T>(f, [&](int64_t c) { return q_row[c] * k_row[c]; }) + (args.bias ? T(1) : T(0));
      left[i * k + j] = eta[i * k + j] * sim[i * k + j];
    }
  for (int64_t c = 0; c < f; ++c)
    for (int64_t j = 0; j < k; ++j) left[(k + c) * k + j] = scale[j] * both[j * in + c];
  if (args.bias)
    for (int64_t j = 0; j < k; ++j) left[(k + f) * k + j] = scale[j];
}

// gamma_sq = gamma^2 for one pair (the mini-batches are written by hoist_block).
template <typename T>
void hoist_pair_start(const InnerloopHoistArgs& args, int64_t pair) {
  const int64_t f = args.width;
  const T* gamma = static_cast<const T*>(args.ln_weight) + (pair % args.heads) * f;
  T* gamma_sq = static_cast<T*>(args.gamma_sq) + pair * f;
  for (int64_t c = 0; c < f; ++c) gamma_sq[c] = gamma[c] * gamma[c];
}

// The gradients of one mini-batch's hoisted inputs (read from both, left, ... of the args) carried
// back to the views, lr, tau and the LayerNorm affine (README.md, "The ends of the training scans").
// work: hoist_work_size(K, f) elements of scratch.
template <typename T>
void hoist_block_backward(const InnerloopHoistArgs& args, int64_t pair, int64_t n, T* work, T* d_tau, T* d_gamma,
                          T* d_beta) {
  const int64_t k = args.mini_batch, f = args.width, in = f + args.bias, heads = args.heads;
  const int64_t pairs = args.batch * heads, index = n * pairs + pair, h = pair % heads;
  const T* xq = pair_rows<T>(static_cast<const T*>(args.xq), args.xq_strides, pair, heads);
  const T* xk = pair_rows<T>(static_cast<const T*>(args.xk), args.xk_strides, pair, heads);
  const T* xv = pair_rows<T>(static_cast<const T*>(args.xv), args.xv_strides, pair, heads);
  const T* lr = pair_rows<T>(static_cast<const T*>(args.lr), args.lr_strides, pair, heads);
  T* dq = pair_rows<T>(static_cast<T*>(args.grad_xq), args.grad_xq_strides, pair, heads);
  T* dk = pair_rows<T>(static_cast<T*>(args.grad_xk), args.grad_xk_strides, pair, heads);
  T* dv = pair_rows<T>(static_cast<T*>(args.grad_xv), args.grad_xv_strides, pair, heads);
  T* d_lr = static_cast<T*>(args.grad_lr) + pair * args.tokens + n * k;
  const T* tau = static_cast<const T*>(args.tau);
  const T* __restrict__ gamma = static_cast<const T*>(args.ln_weight) + h * f;
  const T* __restrict__ beta = static_cast<const T*>(args.ln_bias) + h * f;
  const T* g_both = static_cast<const T*>(args.both) + index * 2 * k * in;
  const T* g_left = static_cast<const T*>(args.left) + index * (k + in) * k;
  const T* g_shift = static_cast<const T*>(args.shift) + index * k * f;
  const T* g_eta = args.eta ? static_cast<const T*>(args.eta) + index * k * k : nullptr;
  const T* g_scale = args.scale ? static_cast<const T*>(args.scale) + index * k : nullptr;
  // scratch: [K x K] sim, d sim, d eta; [K] d scale, lr; [K x f] keys, queries, the update rows' gradient
  // transposed, d Q and d K from the similarities
  T* sim = work;
  T* d_sim = sim + k * k;
  T* d_eta = d_sim + k * k;
  T* d_scale = d_eta + k * k;
  T* lr_k = d_scale + k;
  T* keys = lr_k + k;
  T* queries = keys + k * f;
  T* d_update = queries + k * f;  // d_update[j, c] = d left[K + c, j]
  T* dq_sim = d_update + k * f;
  T* dk_sim = dq_sim + k * f;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = n * k + i;
    std::memcpy(keys + i * f, xk + t * args.xk_strides[2], f * sizeof(T));
    std::memcpy(queries + i * f, xq + t * args.xq_strides[2], f * sizeof(T));
    lr_k[i] = lr[t * args.lr_strides[2]];
  }
  transpose<T>(f, k, g_left + k * k, d_update);  // [f x K] -> [K x f]
  // left's top rows: d eta += d left * sim, d sim = d left * eta (zero above the diagonal)
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const T* q_row = queries + i * f;
      const T* k_row = keys + j * f;
      sim[i * k + j] = sum_over<T>(f, [&](int64_t c) { return q_row[c] * k_row[c]; }) + (args.bias ? T(1) : T(0));
      const T eta = j <= i ? tau[i] * lr_k[j] : T(0);
      d_eta[i * k + j] = j <= i ? g_left[i * k + j] * sim[i * k + j] + (g_eta ? g_eta[i * k + j] : T(0)) : T(0);
      d_sim[i * k + j] = g_left[i * k + j] * eta;
    }
  // d Q = d sim K, d K = d sim^T Q (the similarities' share)
  gemm<T>(k, f, k, d_sim, k, 1, keys, f, dq_sim, f, T(1), false);
  gemm<T>(k, f, k, d_sim, 1, k, queries, f, dk_sim, f, T(1), false);
  for (int64_t j = 0; j < k; ++j) {
    // left's update rows: d scale_j = sum_c d left[K + c, j] K[j, c] (+ the bias row)
    const T* u_row = d_update + j * f;
    const T* k_row = keys + j * f;
    d_scale[j] = sum_over<T>(f, [&](int64_t c) { return u_row[c] * k_row[c]; }) +
                 (args.bias ? g_left[(k + f) * k + j] : T(0)) + (g_scale ? g_scale[j] : T(0));
  }
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = n * k + i;
    T* __restrict__ dq_row = dq + t * args.grad_xq_strides[2];
    T* __restrict__ dk_row = dk + t * args.grad_xk_strides[2];
    T* __restrict__ dv_row = dv + t * args.grad_xv_strides[2];
    const T* __restrict__ both_q = g_both + (k + i) * in;
    const T* __restrict__ both_k = g_both + i * in;
    const T* __restrict__ from_q = dq_sim + i * f;
    const T* __restrict__ from_k = dk_sim + i * f;
    const T* __restrict__ u_row = d_update + i * f;
    const T* __restrict__ shift_row = g_shift + i * f;
    const T* __restrict__ k_row = keys + i * f;
    const T* __restrict__ v_row = xv + t * args.xv_strides[2];
    const T scale_i = tau[k - 1] * lr_k[i];
    INDEPENDENT_ITERATIONS
    for (int64_t c = 0; c < f; ++c) {
      dq_row[c] = both_q[c] + from_q[c];
      // d K = d both + d sim^T Q + scale d left_update^T + gamma d shift; d V = -gamma d shift
      dk_row[c] = both_k[c] + from_k[c] + scale_i * u_row[c] + gamma[c] * shift_row[c];
      dv_row[c] = -gamma[c] * shift_row[c];
    }
    INDEPENDENT_ITERATIONS
    for (int64_t c = 0; c < f; ++c) {
      d_gamma[c] += shift_row[c] * (beta[c] - v_row[c] + k_row[c]);
      d_beta[c] += shift_row[c] * gamma[c];
    }
  }
  // eta[i, j] = tau_i lr_j (j <= i), scale_j = tau_{K-1} lr_j
  for (int64_t j = 0; j < k; ++j) {
    T sum = d_scale[j] * tau[k - 1];
    for (int64_t i = j; i < k; ++i) sum += d_eta[i * k + j] * tau[i];
    d_lr[j] = sum;
    d_tau[k - 1] += d_scale[j] * lr_k[j];
  }
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) d_tau[i] += d_eta[i * k + j] * lr_k[j];
}

// The scratch hoist_block_backward needs: three [K x K], two [K], five [K x f].
inline int64_t hoist_work_size(int64_t k, int64_t f) { return 3 * k * k + 2 * k + 5 * k * f; }

// One pair's sums over its mini-batches, [d tau (K), d gamma (f), d beta (f)] in double (as
// LongSum's: the rounding does not grow with the sequence), before the first: d tau and d beta zero,
// d gamma from gamma_sq = gamma^2.
template <typename T>
std::vector<double> hoist_pair_backward_start(const InnerloopHoistArgs& args, int64_t pair) {
  const int64_t k = args.mini_batch, f = args.width;
  std::vector<double> total(k + 2 * f, 0.0);
  const T* gamma = static_cast<const T*>(args.ln_weight) + (pair % args.heads) * f;
  const T* g_gamma_sq = static_cast<const T*>(args.gamma_sq) + pair * f;
  for (int64_t c = 0; c < f; ++c) total[k + c] = static_cast<double>(T(2) * gamma[c] * g_gamma_sq[c]);
  return total;
}

// One mini-batch of a pair: its d tau, d gamma, d beta, summed in T where the host reads them (a
// scratch there ran the backward 1.3x slower), then added to the pair's ``total``.
template <typename T>
void hoist_pair_backward_block(const InnerloopHoistArgs& args, int64_t pair, int64_t n, T* work,
                               std::vector<double>& total) {
  const int64_t k = args.mini_batch, f = args.width;
  T* d_tau = static_cast<T*>(args.grad_tau) + pair * k;
  T* d_gamma = static_cast<T*>(args.grad_ln_weight) + pair * f;
  T* d_beta = static_cast<T*>(args.grad_ln_bias) + pair * f;
  std::fill_n(d_tau, k, T(0));
  std::fill_n(d_gamma, f, T(0));
  std::fill_n(d_beta, f, T(0));
  hoist_block_backward(args, pair, n, work, d_tau, d_gamma, d_beta);
  for (int64_t i = 0; i < k; ++i) total[i] += static_cast<double>(d_tau[i]);
  for (int64_t c = 0; c < f; ++c) total[k + c] += static_cast<double>(d_gamma[c]);
  for (int64_t c = 0; c < f; ++c) total[k + f + c] += static_cast<double>(d_beta[c]);
}

// The pair's totals written where the host reads them: grad_tau [P, K], grad_ln_weight, grad_ln_bias [P, f].
template <typename T>
void hoist_pair_backward_end(const InnerloopHoistArgs& args, int64_t pair, const std::vector<double>& total) {
  const int64_t k = args.mini_batch, f = args.width;
  T* d_tau = static_cast<T*>(args.grad_tau) + pair * k;
  T* d_gamma = static_cast<T*>(args.grad_ln_weight) + pair * f;
  T* d_beta = static_cast<T*>(args.grad_ln_bias) + pair * f;
  for (int64_t i = 0; i < k; ++i) d_tau[i] = static_cast<T>(total[i]);
  for (int64_t c = 0; c < f; ++c) d_gamma[c] = static_cast<T>(total[k + c]);
  for (int64_t c = 0; c < f; ++c) d_beta[c] = static_cast<T>(total[k + f + c]);
}

// A thread's pairs, mini-batch by mini-batch: one mini-batch of neighbouring pairs lies together in
// the hoisted tensors ([NB, P, ...]) and in the views' [B, T, H, f] memory, so the thread streams
// through both (a pair's mini-batches one after another jump P blocks, and the views' rows H heads,
// a layout the hardware prefetcher does not follow: the backward ran 1.2x slower that way).
template <typename T>
int hoist(const InnerloopHoistArgs& args, bool backward) {
  return parallel_over_pairs(args.batch * args.heads, args.num_threads, [&](int64_t first, int64_t last) {
    const int64_t k = args.mini_batch, f = args.width;
    std::vector<T> work(hoist_work_size(k, f));
    std::vector<std::vector<double>> totals;  // the backward's sums, one per pair of the thread
    for (int64_t pair = first; pair < last; ++pair) {
      if (backward)
        totals.push_back(hoist_pair_backward_start<T>(args, pair));
      else
        hoist_pair_start<T>(args, pair);
    }
    for (int64_t n = 0; n < args.tokens / k; ++n)
      for (int64_t pair = first; pair < last; ++pair) {
        if (backward)
          hoist_pair_backward_block(args, pair, n, work.data(), totals[pair - first]);
        else
          hoist_block(args, pair, n, work.data());  // work: its sim
      }
    for (int64_t pair = first; backward && pair < last; ++pair)
      hoist_pair_backward_end<T>(args, pair, totals[pair - first]);
  });
}

int hoist_entry(const InnerloopHoistArgs* args, bool backward) {
  if (args->batch < 0 || args->heads < 1 || args->width < 1 || args->mini_batch < 1 ||
      args->tokens % args->mini_batch != 0 || (args->bias != 0 && args->bias != 1))
    return 2;
  return by_dtype(args->dtype, [&](auto zero) { return hoist<decltype(zero)>(*args, backward); });
}

// out = xq + gamma LN(z) + beta for one pair's rows; the backward: d z = rstd P(gamma d out) with
// P(v) = v - mean(v) - xhat mean(v xhat), d gamma += d out xhat, d beta += d out.
constexpr int64_t kOutputNormBlock = 64;  // tokens whose d gamma, d beta are summed in T, then in double

template <typename T>
void output_norm_pair(const InnerloopOutputNormArgs& args, int64_t pair, bool backward) {
  const int64_t f = args.width, heads = args.heads, h = pair % heads;
  const T* gamma = static_cast<const T*>(args.ln_weight) + h * f;
  const T* beta = static_cast<const T*>(args.ln_bias) + h * f;
  const T eps = T(args.eps);
  const T* z = static_cast<const T*>(args.z) + pair * args.tokens * f;
  if (!backward) {
    const T* xq = pair_rows<T>(static_cast<const T*>(args.xq), args.xq_strides, pair, heads);
    T* out = pair_rows<T>(static_cast<T*>(args.out), args.out_strides, pair, heads);
    for (int64_t t = 0; t < args.tokens; ++t) {
      const T* z_row = z + t * f;
      const T* xq_row = xq + t * args.xq_strides[2];
      T* out_row = out + t * args.out_strides[2];
      T mean, rstd;
      row_moments(f, z_row, eps, &mean, &rstd);
      for (int64_t c = 0; c < f; ++c) out_row[c] = xq_row[c] + beta[c] + ((z_row[c] - mean) * rstd) * gamma[c];
    }
    return;
  }
  const T* grad_out = pair_rows<T>(static_cast<const T*>(args.grad_out), args.grad_out_strides, pair, heads);
  T* grad_z = static_cast<T*>(args.grad_z) + pair * args.tokens * f;
  LongSum<T> gamma_sum(static_cast<T*>(args.grad_ln_weight) + pair * f, f);  // over blocks of
  LongSum<T> beta_sum(static_cast<T*>(args.grad_ln_bias) + pair * f, f);     // kOutputNormBlock tokens
  const T inv_width = T(1) / T(f);
  for (int64_t start = 0; start < args.tokens; start += kOutputNormBlock) {
    T* d_gamma = gamma_sum.start_block();
    T* d_beta = beta_sum.start_block();
    for (int64_t t = start; t < std::min(start + kOutputNormBlock, args.tokens); ++t) {
      const T* z_row = z + t * f;
      const T* g_row = grad_out + t * args.grad_out_strides[2];
      T* dz_row = grad_z + t * f;
      T mean, rstd;
      row_moments(f, z_row, eps, &mean, &rstd);
      for (int64_t c = 0; c < f; ++c) {
        const T xhat = (z_row[c] - mean) * rstd;
        dz_row[c] = g_row[c] * gamma[c];  // d xhat
        d_gamma[c] += g_row[c] * xhat;
        d_beta[c] += g_row[c];
      }
      const T mean_d = sum_over<T>(f, [&](int64_t c) { return dz_row[c]; }) * inv_width;
      const T mean_dx =
          sum_over<T>(f, [&](int64_t c) { return dz_row[c] * ((z_row[c] - mean) * rstd); }) * inv_width;
      for (int64_t c = 0; c < f; ++c) dz_row[c] = rstd * (dz_row[c] - mean_d - ((z_row[c] - mean) * rstd) * mean_dx);
    }
    gamma_sum.end_block();
    beta_sum.end_block();
  }
  gamma_sum.write();
  beta_sum.write();
}

int output_norm_entry(const InnerloopOutputNormArgs* args, bool backward) {
  if (args->batch < 0 || args->heads < 1 || args->width < 1 || args->tokens < 0) return 2;
  return by_dtype(args->dtype, [&](auto zero) {
    using T = decltype(zero);
    return parallel_over_pairs(args->batch * args->heads, args->num_threads, [&](int64_t first, int64_t last) {
      for (int64_t pair = first; pair < last; ++pair) output_norm_pair<T>(*args, pair, backward);
    });
  });
}

int stack_scan_entry(const InnerloopStackScanArgs* args, bool backward) {
  if (args->num_mini_batches < 0 || args->pairs < 0 || args->mini_batch < 1 || args->num_layers < 2 ||
      args->num_layers > kMaxLayers)
    return 2;
  for (int32_t l = 0; l < args->num_layers; ++l) {
    if (args->in_dims[l] < 1 || args->out_dims[l] < 1) return 2;
    if (l > 0 && args->in_dims[l] != args->out_dims[l - 1] + (args->has_bias[l] ? 1 : 0)) return 2;
  }
  if (args->record_size != stack_record_size(args->num_layers, args->mini_batch, args->out_dims)) return 2;
  const int64_t element = args->dtype == kFloat64 ? 8 : 4;
  for (int32_t l = 0; l < args->num_layers && !backward; ++l)
    advise_huge_pages(args->starts[l], args->num_mini_batches * args->pairs * args->in_dims[l] * args->out_dims[l] * element);
  if (!backward) advise_huge_pages(args->records, args->num_mini_batches * args->pairs * args->record_size * element);
  return by_dtype(args->dtype, [&](auto zero) { return stack_scan<decltype(zero)>(*args, backward); });
}

}  // namespace

extern "C" {

// 0 on success; 1: unsupported dtype; 2: invalid sizes; 3: an exception (e.g. out of memory).
int innerloop_stack_forward(const InnerloopStackArgs* args) {
  if (args->num_layers < 1 || args->num_layers > kMaxLayers || args->mini_batch < 1 ||
      args->tokens % args->mini_batch != 0)
    return 2;
  return by_dtype(args->dtype, [&](auto zero) { return run<decltype(zero)>(*args); });
}

// 0 on success; 1: unsupported dtype; 2: invalid sizes; 3: an exception (e.g. out of memory).
int innerloop_stack_decode(const InnerloopDecodeArgs* args) {
  if (args->num_layers < 1 || args->num_layers > kMaxLayers) return 2;
  return by_dtype(args->dtype, [&](auto zero) { return decode<decltype(zero)>(*args); });
}

// The training scan of a one-layer stack (InnerloopLinearScanArgs); return codes as above.
int innerloop_linear_scan_forward(const InnerloopLinearScanArgs* args) { return linear_scan_entry(args, false); }
int innerloop_linear_scan_backward(const InnerloopLinearScanArgs* args) { return linear_scan_entry(args, true); }

// The training scan of a deeper stack (InnerloopStackScanArgs); return codes as above.
int innerloop_stack_scan_forward(const InnerloopStackScanArgs* args) { return stack_scan_entry(args, false); }
int innerloop_stack_scan_backward(const InnerloopStackScanArgs* args) { return stack_scan_entry(args, true); }

// Training, around the scans (InnerloopHoistArgs, InnerloopOutputNormArgs); return codes as above.
int innerloop_hoist_forward(const InnerloopHoistArgs* args) { return hoist_entry(args, false); }
int innerloop_hoist_backward(const InnerloopHoistArgs* args) { return hoist_entry(args, true); }
int innerloop_output_norm_forward(const InnerloopOutputNormArgs* args) { return output_norm_entry(args, false); }
int innerloop_output_norm_backward(const InnerloopOutputNormArgs* args) { return output_norm_entry(args, true); }

// 1 if the library was built with OpenMP (runs on several threads), else 0.
int innerloop_uses_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// tanh as the kernel computes it in float32, exported so that the tests can check its accuracy.
void innerloop_tanh_f32(const float* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = tanh_of(src[i]);
}

}  // extern "C"
