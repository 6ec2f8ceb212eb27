// A register-tiled float GEMM whose epilogue runs on the accumulators, for the AVX2 and AVX-512
// levels: C (m x n) = Σ_p A_p (m x k_p) · B_pᵀ, B_p (n x k_p) row-major like a layer's weight,
// then epi(row, col, acc, count) for each vector of C while it is still in registers (bias,
// activation, activation derivative: whatever the caller's kernel needs), so no pass over C
// follows the GEMM. Up to two terms: the forward's x·Wᵀ, the jvp's x_t·Wᵀ + x·W_tᵀ.
//
// The micro-kernel keeps a kTileRows x (kTileVecs vectors) block of C in registers (AVX-512:
// 6 x 64 floats in 24 of the 32 zmm registers; AVX2: 6 x 16 in 12 of 16 ymm, BLIS's shapes for
// Zen and Haswell), broadcasts one element of A per row and k, and reads B from a copy packed per
// block of columns, k-major and zero-padded to whole blocks (packed per call by pack() or
// pack_all(); kernels_impl.h's tiles_parallel has each thread pack the blocks it reads where it
// can). A is read in place, one pointer per row; the last block of rows repeats its last row
// rather than reading past the end, and stores only the rows that exist.
//
// InPlaceTileGemm reads B where it lies instead, for B stored k-major (b_trans: a row of W for
// dx = dz·W, a row of x for dW = dzᵀ·x), and computes only the rows that exist: for few rows of A,
// where packing B (a copy of all of it per call) would cost more than the GEMM (small_m.h).
//
// Why: MKL runs its AVX2 kernels on AMD CPUs at every level (65536x64x64 addmm at 74 GFLOP/s on
// one AMD EPYC Zen 5 core, 31 % of its AVX-512 peak), and any GEMM followed by a separate
// elementwise pass reads and writes C once more. Compiled per SIMD level (kernels_impl.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/gemm.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fused_backprop::cpu::CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveTileGemm = true;
#else
constexpr bool kHaveTileGemm = false;
#endif

constexpr int kTileRows = 6;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileVecs = 4;
#else
constexpr int kTileVecs = 2;
#endif

// One term A · Bᵀ: A is (m x k) with leading dimension lda, B (n x k) with ldb, or stored as its
// transpose (k x n) when b_trans; A stored as its transpose (k x m) when a_trans (InPlaceTileGemm
// only).
struct TileTerm {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  int64_t k;
  bool b_trans = false;
  bool a_trans = false;
};

// f.template operator()<C>() for C = count, 1 <= count <= kMax: a run-time count as a template
// argument (the sizes of a micro-kernel's partial tiles).
template <int kMax, int C = 1, typename F>
void with_count(int64_t count, const F& f) {
  if constexpr (C < kMax) {
    if (count != C) return with_count<kMax, C + 1>(count, f);
  }
  f.template operator()<C>();
}

template <bool kPacked>
class TileGemmOf {
 public:
  using V = at::vec::Vectorized<float>;
  static constexpr int64_t kBlockCols = kTileVecs * V::size();

  // Packs the B's of `terms` (a null term's a or b: left out) for C of n columns; in place, every
  // term's B must be stored k-major (b_trans).
  TileGemmOf(std::initializer_list<TileTerm> terms, int64_t n) : n_(n) {
    for (const TileTerm& t : terms) {
      if (t.a != nullptr && t.b != nullptr && t.k > 0) terms_.push_back(t);
    }
    for (const TileTerm& t : terms_) {
      TORCH_INTERNAL_ASSERT(kPacked ? !t.a_trans : t.b_trans, "TileGemm: A stored as is, InPlaceTileGemm: B k-major");
      k_all_ += t.k;
    }
    blocks_ = (n + kBlockCols - 1) / kBlockCols;
    // Rows per group: a group's rows of A stay in a quarter of L2 while every column block passes
    // over them (B's blocks come from L2 or L3 once per group, not once per tile).
    const int64_t fit = l2_cache_bytes() / 4 / std::max<int64_t>(1, k_all_ * int64_t(sizeof(float)));
    group_rows_ = std::max<int64_t>(1, fit / kTileRows) * kTileRows;
    if constexpr (kPacked) packed_.resize(blocks_ * k_all_ * kBlockCols);  // packed by pack() / pack_all()
  }

  // Packs B's column blocks [cb0, cb1): TileGemm's rows() reads only blocks packed before.
  void pack(int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      float* dst = block(cb);
      const int64_t j0 = cb * kBlockCols, cols = std::min(kBlockCols, n_ - j0);
      for (const TileTerm& t : terms_) {
        if (t.b_trans) {
          for (int64_t kk = 0; kk < t.k; ++kk) std::memcpy(dst + kk * kBlockCols, t.b + kk * t.ldb + j0, cols * sizeof(float));
        } else {
          transpose_into(t.b + j0 * t.ldb, t.ldb, dst, cols, t.k);
        }
        for (int64_t kk = 0; cols < kBlockCols && kk < t.k; ++kk) {
          std::fill(dst + kk * kBlockCols + cols, dst + (kk + 1) * kBlockCols, 0.f);
        }
        dst += t.k * kBlockCols;
      }
    }
  }

  // Packs every column block, on all threads.
  void pack_all() {
    at::parallel_for(0, blocks_, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, k_all_ * kBlockCols)),
                     [&](int64_t cb0, int64_t cb1) { pack(cb0, cb1); });
  }

  int64_t k_all() const { return k_all_; }

  // Whether B, packed, has its column blocks within half of L2 (the tile GEMM's condition).
  static bool fits(int64_t k_all) { return k_all * kBlockCols * int64_t(sizeof(float)) <= l2_cache_bytes() / 2; }

  // Column blocks of C (of kBlockCols columns, the last one partial).
  int64_t blocks() const { return blocks_; }

  // Rows [r0, r1) of C through epi(i, j, acc, count): acc holds C[i, j .. j + count) (count <=
  // V::size(), the rest of the vector is padding), in column blocks [cb0, cb1) (default: all).
  // a0, unless null, stands for the first term's A in these rows (row r0 of A at a0): for an A
  // that lives in a per-thread buffer.
  template <typename Epi>
  void rows(int64_t r0, int64_t r1, const Epi& epi, const float* a0 = nullptr, int64_t cb0 = 0,
            int64_t cb1 = -1) const {
    if (cb1 < 0) cb1 = blocks_;
    for (int64_t g0 = r0; g0 < r1; g0 += group_rows_) {
      const int64_t g1 = std::min(r1, g0 + group_rows_);
      for (int64_t cb = cb0; cb < cb1; ++cb) {
        for (int64_t i = g0; i < g1; i += kTileRows) {
          const float* a_i = a0 != nullptr ? a0 + (i - r0) * terms_[0].lda : nullptr;
          const int64_t rows = std::min<int64_t>(kTileRows, g1 - i);
          if constexpr (kPacked) {
            tile<kTileRows>(i, rows, cb, epi, a_i);
          } else {
            with_count<kTileRows>(rows, [&]<int R>() { tile<R>(i, R, cb, epi, a_i); });
          }
        }
      }
    }
  }

 private:
  // dst[kk * kBlockCols + j] = src[j * ld + kk] for j < rows, kk < k: rows of B into a packed
  // block's columns, 8 x 8 elements at a time in registers (element by element, the packing took
  // 4 % of a 512x256x256 forward on AMD EPYC Zen 4; at::vec's transpose_mxn for AVX-512, which
  // zeroes a 1 KiB stack buffer per 16 x 16 block, 14 %).
  static void transpose_into(const float* src, int64_t ld, float* dst, int64_t rows, int64_t k) {
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    for (; j + 8 <= rows; j += 8) {
      int64_t kk = 0;
      for (; kk + 8 <= k; kk += 8) transpose8x8(src + j * ld + kk, ld, dst + kk * kBlockCols + j, kBlockCols);
      for (; kk < k; ++kk) {
        for (int64_t r = j; r < j + 8; ++r) dst[kk * kBlockCols + r] = src[r * ld + kk];
      }
    }
#endif
    for (; j < rows; ++j) {
      for (int64_t kk = 0; kk < k; ++kk) dst[kk * kBlockCols + j] = src[j * ld + kk];
    }
  }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // dst[c * ldd + r] = src[r * ld + c] for r, c < 8 (AVX: the levels with a tile GEMM).
  static void transpose8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; i += 2) {  // t[i], t[i + 1]: rows i, i + 1 interleaved (lo, hi pairs of each lane)
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // r[i + c]: column c of rows i .. i + 3, per 128-bit lane
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
      _mm256_storeu_ps(dst + (c + 4) * ldd, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
    }
  }
#endif

  const float* block(int64_t cb) const { return packed_.data() + cb * k_all_ * kBlockCols; }
  float* block(int64_t cb) { return packed_.data() + cb * k_all_ * kBlockCols; }

  // The tile of rows [i0, i0 + rows) and column block cb, R rows of accumulators (R > rows: the
  // last row repeated); a0: the first term's A at row i0, or null. Never inlined: inlined into a
  // caller (forward_tiles, where at::parallel_for runs its body on the calling thread, as with one
  // thread) GCC kept the accumulators on the stack, a store per FMA (256x256x256 forward on one
  // AMD EPYC Zen 4 core: 874 us, against MKL's 340).
  template <int R, typename Epi>
  __attribute__((noinline)) void tile(int64_t i0, int64_t rows, int64_t cb, const Epi& epi, const float* a0) const {
    constexpr int W = V::size();
    V acc[R][kTileVecs];
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kTileVecs; ++v) acc[r][v] = V(0.f);
    }
    const int64_t j0 = cb * kBlockCols, cols = std::min(kBlockCols, n_ - j0);
    const float* bp = kPacked ? block(cb) : nullptr;
    for (const TileTerm& t : terms_) {
      // A's element (i0 + r, kk) at a[r][kk * a_step]
      const int64_t a_row = t.a_trans ? 1 : t.lda, a_step = kPacked || !t.a_trans ? 1 : t.lda;
      const float* a[R];
      const float* a_i0 = a0 != nullptr && &t == terms_.data() ? a0 : t.a + i0 * a_row;
      for (int r = 0; r < R; ++r) a[r] = a_i0 + std::min<int64_t>(r, rows - 1) * a_row;
      // One k step: b[v] holds B's row kk, columns j0 + v·W onwards.
      const auto step = [&](int64_t kk, const V (&b)[kTileVecs]) {
        for (int r = 0; r < R; ++r) {
          const V ar(a[r][kk * a_step]);
          for (int v = 0; v < kTileVecs; ++v) acc[r][v] = at::vec::fmadd(ar, b[v], acc[r][v]);
        }
      };
      V b[kTileVecs];
      if constexpr (kPacked) {
        for (int64_t kk = 0; kk < t.k; ++kk, bp += kBlockCols) {
          for (int v = 0; v < kTileVecs; ++v) b[v] = V::loadu(bp + v * W);
          step(kk, b);
        }
      } else if (cols == kBlockCols) {
        for (int64_t kk = 0; kk < t.k; ++kk) {
          for (int v = 0; v < kTileVecs; ++v) b[v] = V::loadu(t.b + kk * t.ldb + j0 + v * W);
          step(kk, b);
        }
      } else {  // the last, partial block: no load past B's columns
        for (int64_t kk = 0; kk < t.k; ++kk) {
          for (int v = 0; v < kTileVecs; ++v) {
            const int64_t count = std::clamp<int64_t>(cols - v * W, 0, W);
            b[v] = count > 0 ? V::loadu(t.b + kk * t.ldb + j0 + v * W, count) : V(0.f);
          }
          step(kk, b);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int v = 0; v < kTileVecs; ++v) {
        const int64_t j = j0 + v * W, count = std::min<int64_t>(W, n_ - j);
        if (count <= 0) break;
        epi(i0 + r, j, acc[r][v], static_cast<int>(count));
      }
    }
  }

  std::vector<TileTerm> terms_;
  int64_t n_, k_all_ = 0, blocks_ = 0, group_rows_ = kTileRows;
  KeptBuffer packed_;
};

using TileGemm = TileGemmOf<true>;
using InPlaceTileGemm = TileGemmOf<false>;

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
