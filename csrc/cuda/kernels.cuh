// The handwritten CUDA kernels of fused_backprop: torch-free, templated on element type and
// activation, taking raw pointers, sizes and leading dimensions.
//
// Compiled three ways from this one source:
//   * by nvcc for the GPU (kernels_<dtype>.cu instantiate, through instantiate.cuh, the launchers
//     for one element type and every activation of activations.def);
//   * by nvcc -Xptxas -v for the static resource checks (tests/test_cuda_static.py);
//   * by g++ for the CPU, under the host-execution harness (tests/cuda_harness/cuda_host.h), which
//     must be included before this header.
// Kernels use only the CUDA features the harness emulates (see tests/cuda_harness/README.md):
// blockIdx/threadIdx/blockDim/gridDim, static shared memory (FB_SHARED_*), __syncthreads, __shfl_down_sync,
// 16-byte uint4 loads/stores, cp.async (FB_CP_ASYNC_*), and nvcuda::wmma fragment/fill/load/mma/store on
// 16x16x16 tiles.
//
// GEMM forms (every matrix row-major with unit column stride; "rows" x "red" operands):
//   forward  out[M,N] = act(x[M,K] . W[N,K]^T + b)        A = x  (k-contiguous), B = W (k-contiguous)
//   dX[M,K] = dZ[M,N] . W[N,K]                            A = dZ (k-contiguous), B = W (row-contiguous)
//   dW[N,K] = dZ[M,N]^T . x[M,K]                          A = dZ (row-contiguous), B = x (row-contiguous)
// where dZ = dY * act'(.) is formed inside the tile loaders from dY and what the forward saved
// (the output y or the pre-activation z, per kSaved<A>), so it is never written to memory (under
// recompute a GEMM epilogue writes it once instead). The forward epilogue can also store z.
// Every kernel takes the activation's parameter `a` (leaky relu's slope) in the accumulation type.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "launch.h"

#if defined(__CUDACC__)
#include <mma.h>
#endif

// Shared memory declarations: __shared__ under nvcc; per-block guarded heap blocks under the
// harness (ASan redzones, NaN-filled, freed at block end).
#if defined(FB_CUDA_HOST_HARNESS)
#define FB_SHARED_ARRAY(T, name, n) CUDA_HOST_SHARED(T, name, n)
#define FB_SHARED_OBJECT(T, name) CUDA_HOST_SHARED_OBJECT(T, name)
#else
#define FB_SHARED_ARRAY(T, name, n) __shared__ __align__(32) T name[n]
#define FB_SHARED_OBJECT(T, name) __shared__ T name
#endif

// cp.async: FB_CP_ASYNC_16(dst, src, full) starts a 16-byte global -> shared copy that lands
// asynchronously (cp.async.cg, L2 only), or zero-fills the 16 bytes when `full` is false (src-size
// 0: nothing is read, src only has to be a valid address); FB_CP_ASYNC_COMMIT() closes this
// thread's group of copies; FB_CP_ASYNC_WAIT(n) blocks until at most the n newest of its committed
// groups are still in flight. The copies are visible to other threads after a __syncthreads that
// follows the wait. The harness queues the copies and performs a group only at the wait that
// completes it (cuda_host.h); before sm_80 a copy is a synchronous 16-byte load and store.
#if defined(FB_CUDA_HOST_HARNESS)
#define FB_CP_ASYNC_16(dst, src, full) ::cuda_host::cp_async_16((dst), (src), (full))
#define FB_CP_ASYNC_COMMIT() ::cuda_host::cp_async_commit()
#define FB_CP_ASYNC_WAIT(n) ::cuda_host::cp_async_wait(n)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FB_CP_ASYNC_16(dst, src, full)                                                              \
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(static_cast<unsigned>(      \
                   __cvta_generic_to_shared(dst))),                                                 \
               "l"(src), "r"((full) ? 16 : 0)                                                       \
               : "memory")
#define FB_CP_ASYNC_COMMIT() asm volatile("cp.async.commit_group;\n" ::: "memory")
#define FB_CP_ASYNC_WAIT(n) asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory")
#else
#define FB_CP_ASYNC_16(dst, src, full) \
  (*reinterpret_cast<uint4*>(dst) = (full) ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u})
#define FB_CP_ASYNC_COMMIT() ((void)0)
#define FB_CP_ASYNC_WAIT(n) ((void)0)
#endif

namespace fused_backprop::cuda {

// ------------------------------------------------------------------------------------------
// Element types: conversions to and from the accumulation type acc_t (launch.h), explicit
// intrinsics only, so the kernels build under torch's -D__CUDA_NO_HALF_CONVERSIONS__ /
// -D__CUDA_NO_HALF_OPERATORS__.
// ------------------------------------------------------------------------------------------
template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
inline constexpr bool kTensorCore = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Elements per 16-byte vector.
template <typename T>
inline constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// 16-byte global/shared accesses through uint4 (the caller guarantees 16-byte alignment).
template <typename T, int V>
union Vec16 {
  static_assert(sizeof(T) * V == 16, "a Vec16 is 16 bytes");
  uint4 u;
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[V]) {
  Vec16<T, V> t;
  t.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = t.v[j];
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&in)[V]) {
  Vec16<T, V> t;
#pragma unroll
  for (int j = 0; j < V; ++j) t.v[j] = in[j];
  *reinterpret_cast<uint4*>(p) = t.u;
}

// ------------------------------------------------------------------------------------------
// GEMM operands. An operand is a rows x red matrix (red = the reduction dimension). KC: the
// element (r, k) lives at p[r*ld + k] (contiguous along k); otherwise at p[k*ld + r]
// (contiguous along r). load<V>(r, k, v) fills V elements along the contiguous dimension
// starting at (r, k), zero outside the matrix; with V > 1 the caller has checked `vec`
// (16-byte aligned base, ld and contiguous extent multiples of V), so a vector is either
// entirely inside or entirely outside.
// ------------------------------------------------------------------------------------------
// kAsync: the operand's tiles can go to shared memory as they are, by cp.async (copy_async, for
// `vec` operands: one 16-byte copy of the V elements at (r, k), zero-filled outside the matrix).
template <typename T, bool KC>
struct PlainOperand {
  static constexpr bool kKContig = KC, kAsync = true;
  const T* __restrict__ p;
  int64_t ld, rows, red;
  bool vec;

  __device__ __forceinline__ void copy_async(T* dst, int64_t r, int64_t k) const {
    const bool in = r < rows && k < red;
    FB_CP_ASYNC_16(dst, in ? (KC ? p + r * ld + k : p + k * ld + r) : p, in);
  }

  template <int V>
  __device__ __forceinline__ void load(int64_t r, int64_t k, T (&v)[V]) const {
    if (r < rows && k < red) {
      const T* q = KC ? p + r * ld + k : p + k * ld + r;
      if constexpr (V == 1) {
        v[0] = *q;
      } else {
        load_vec<T, V>(q, v);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = Num<T>::from_acc(acc_t<T>(0));
    }
  }
};

// dZ = dY * act'(z), rounded to T like the materialised dZ of an eager backward: from what the
// forward saved (grad_from_saved<A>: the output y or the pre-activation z, per kSaved<A>), or from
// the recomputed pre-activation z.
template <typename T, Activation A>
__device__ __forceinline__ T dz_from_saved(T dy, T saved, acc_t<T> a) {
  return Num<T>::from_acc(Num<T>::to_acc(dy) * grad_from_saved<A, acc_t<T>>(Num<T>::to_acc(saved), a));
}
template <typename T, Activation A>
__device__ __forceinline__ T dz_from_preact(T dy, acc_t<T> z, acc_t<T> a) {
  return Num<T>::from_acc(Num<T>::to_acc(dy) * Act<A>::template grad_from_preact<acc_t<T>>(z, a));
}

// dZ formed from dY and the saved y or z while loading the tile (in registers: no cp.async).
template <typename T, Activation A, bool KC>
struct DzFromSavedOperand {
  static constexpr bool kKContig = KC, kAsync = false;
  const T* __restrict__ dy;
  int64_t lddy;
  const T* __restrict__ saved;
  int64_t lds;
  int64_t rows, red;
  bool vec;
  acc_t<T> a;

  template <int V>
  __device__ __forceinline__ void load(int64_t r, int64_t k, T (&v)[V]) const {
    if (r < rows && k < red) {
      const T* qd = KC ? dy + r * lddy + k : dy + k * lddy + r;
      const T* qs = KC ? saved + r * lds + k : saved + k * lds + r;
      T d[V], o[V];
      if constexpr (V == 1) {
        d[0] = *qd;
        o[0] = *qs;
      } else {
        load_vec<T, V>(qd, d);
        load_vec<T, V>(qs, o);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = dz_from_saved<T, A>(d[j], o[j], a);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = Num<T>::from_acc(acc_t<T>(0));
    }
  }
};

// A BR x BK operand tile staged in registers: every thread holds E = BR*BK/NT elements. The
// GEMM main loops fetch the next tile from global memory into these registers while computing
// on the current one in shared memory (register-staged software pipelining), then store them to
// shared memory after the barrier.
// The elements are kept as 16-byte vectors: the unaligned fallback packs its element loads into
// them as it goes (two 16-bit elements per register, as the vector path holds them).
template <int BR, int BK, int NT, typename T>
struct TileRegs {
  static constexpr int E = BR * BK / NT, NV = E / kVec<T>;
  static_assert(BR * BK % NT == 0 && E % kVec<T> == 0, "a tile must split into whole vectors per thread");
  Vec16<T, kVec<T>> v[NV];
};

// Where thread tid's it-th vector of a tile starts: V = kVec<T> consecutive elements along the
// operand's contiguous dimension, consecutive threads on consecutive vectors (coalesced).
template <int BR, int BK, int NT, bool KC, typename T>
struct TileVec {
  int r, k;
  __device__ __forceinline__ TileVec(int tid, int it) {
    constexpr int V = kVec<T>;
    static_assert(BK % V == 0 && BR % V == 0, "tile edges must hold whole vectors");
    constexpr int CV = KC ? BK / V : BR / V;  // vectors along the contiguous dimension
    const int i = tid + it * NT;
    const int outer = i / CV, inner = (i % CV) * V;
    r = KC ? outer : inner;
    k = KC ? inner : outer;
  }
};

// Fetches the tile of `op` at (r0, k0) into registers, one vector per TileVec: a 16-byte load
// where `vec` allows, else (unaligned or odd-sized operands) V element loads, each masked on its
// own. Both paths stage the same elements, so the fallback is pipelined like the vector path and
// store_tile writes both with the same (vector) shared stores.
template <int BR, int BK, int NT, class Op, typename T>
__device__ __forceinline__ void fetch_tile(const Op& op, TileRegs<BR, BK, NT, T>& t, int64_t r0, int64_t k0,
                                           int tid) {
  constexpr bool KC = Op::kKContig;
  constexpr int V = kVec<T>;
  constexpr int NV = TileRegs<BR, BK, NT, T>::NV;
  if (op.vec) {
#pragma unroll
    for (int it = 0; it < NV; ++it) {
      const TileVec<BR, BK, NT, KC, T> at(tid, it);
      op.template load<V>(r0 + at.r, k0 + at.k, t.v[it].v);
    }
  } else {
#pragma unroll
    for (int it = 0; it < NV; ++it) {
      const TileVec<BR, BK, NT, KC, T> at(tid, it);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        T s[1];
        op.template load<1>(r0 + at.r + (KC ? 0 : j), k0 + at.k + (KC ? j : 0), s);
        t.v[it].v[j] = s[0];
      }
    }
  }
}

// Starts the cp.async copies of the tile of `op` at (r0, k0) (op.vec holds) into the shared tile S
// laid out along the operand's contiguous dimension (Tile::at, the WMMA tiles), one 16-byte copy
// per TileVec, as fetch_tile + store_tile would place them; vectors outside the matrix are zeros.
template <int BR, int BK, int NT, class Tile, class Op, typename T>
__device__ __forceinline__ void copy_tile_async(const Op& op, T* __restrict__ S, int64_t r0, int64_t k0, int tid) {
#pragma unroll
  for (int it = 0; it < TileRegs<BR, BK, NT, T>::NV; ++it) {
    const TileVec<BR, BK, NT, Op::kKContig, T> at(tid, it);
    op.copy_async(&S[Tile::at(at.r, at.k)], r0 + at.r, k0 + at.k);
  }
}

// db folded into the dW GEMM: its A operand, dZ^T (rows = N, contiguous along the rows), also
// hands the row sums of its tiles to `sums`. The blocks of the first column tile add up the
// staged A tile, P = NT / BM threads per row (thread t: row t % BM, every P-th k from t / BM),
// and thread t of split z writes sums[(z * P + t / BM) * rows + row]; db_finalize_kernel adds
// those partials in a fixed order. dZ is read once for dW and db instead of once more for db.
template <typename T, class Op>
struct RowSumOperand : Op {
  acc_t<T>* __restrict__ sums;
};
template <class Op>
inline constexpr bool kRowSums = false;
template <typename T, class Op>
inline constexpr bool kRowSums<RowSumOperand<T, Op>> = true;

template <int BM, int NT>
inline constexpr int kRowSumParts = NT / BM;

// Adds this thread's share of the k-major A tile S[k * ld + r] (BK steps) to s.
template <int BM, int BK, int NT, typename T>
__device__ __forceinline__ void add_row_sums(const T* __restrict__ S, int ld, int tid, acc_t<T>& s) {
  constexpr int P = kRowSumParts<BM, NT>;
  static_assert(NT % BM == 0 && BK % P == 0, "whole k steps per row-sum thread");
#pragma unroll
  for (int j = 0; j < BK / P; ++j) s += Num<T>::to_acc(S[(tid / BM + j * P) * ld + tid % BM]);
}

template <int BM, int NT, class AOp, typename Acc>
__device__ __forceinline__ void store_row_sums(const AOp& a, Acc s, int64_t m0, int64_t rows, int tid) {
  constexpr int P = kRowSumParts<BM, NT>;
  const int64_t r = m0 + tid % BM;
  if (r < rows) a.sums[(static_cast<int64_t>(blockIdx.z) * P + tid / BM) * rows + r] = s;
}

// split-K: block z reduces [begin, end) of the reduction (split_len is a multiple of BK, so no
// tile straddles two chunks; the operands are masked at `end` all the same). The GEMM kernels'
// shared set-up.
template <class AOp, class BOp>
struct SplitKSlice {
  int64_t begin, end;
  AOp a;
  BOp b;
};

template <class AOp, class BOp>
__device__ __forceinline__ SplitKSlice<AOp, BOp> split_k_slice(const AOp& a, const BOp& b, int64_t split_len,
                                                               int64_t red) {
  const int64_t begin = static_cast<int64_t>(blockIdx.z) * split_len;
  const int64_t end = begin + split_len < red ? begin + split_len : red;
  SplitKSlice<AOp, BOp> s{begin, end, a, b};
  s.a.red = end;
  s.b.red = end;
  return s;
}

// Stores the tile fetch_tile staged to shared memory S, laid out k-major (S[k*LDS + r]) or
// r-major (S[r*LDS + k]). A vector that runs along the smem row is one 16-byte shared store; the
// WMMA kernel lays every tile out along its operand's contiguous dimension, so it has only those.
// The FMA kernel's k-major tiles of k-contiguous operands take V scalar stores per vector (its
// padding keeps them free of bank conflicts).
template <int BR, int BK, int NT, bool SMEM_KMAJOR, int LDS, bool KC, typename T>
__device__ __forceinline__ void store_tile(const TileRegs<BR, BK, NT, T>& t, T* __restrict__ S, int tid) {
  constexpr int V = kVec<T>;
#pragma unroll
  for (int it = 0; it < TileRegs<BR, BK, NT, T>::NV; ++it) {
    const TileVec<BR, BK, NT, KC, T> at(tid, it);
    if constexpr (KC != SMEM_KMAJOR) {
      *reinterpret_cast<uint4*>(SMEM_KMAJOR ? &S[at.k * LDS + at.r] : &S[at.r * LDS + at.k]) = t.v[it].u;
    } else {
      static_assert(SMEM_KMAJOR, "no r-major tile of a row-contiguous operand: it would take transposed stores");
#pragma unroll
      for (int j = 0; j < V; ++j) S[(at.k + j) * LDS + at.r] = t.v[it].v[j];
    }
  }
}

// ------------------------------------------------------------------------------------------
// Epilogues: called once per in-bounds output element with the fp accumulator.
// ------------------------------------------------------------------------------------------
// out = act(z), z = acc + b; preact (unless nullptr) = z rounded to T.
template <typename T, Activation A>
struct ForwardEpilogue {
  T* __restrict__ out;
  int64_t ldo;
  T* __restrict__ preact;
  int64_t ldp;
  const T* __restrict__ bias;
  acc_t<T> a;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, acc_t<T> z) const {
    if (bias != nullptr) z += Num<T>::to_acc(bias[c]);
    if (preact != nullptr) preact[r * ldp + c] = Num<T>::from_acc(z);
    out[r * ldo + c] = Num<T>::from_acc(Act<A>::template forward<acc_t<T>>(z, a));
  }
  __device__ __forceinline__ const ForwardEpilogue& for_split(unsigned) const { return *this; }
};

// Recompute: z = acc + b is the pre-activation; writes dZ = dY * act'(z) (rounded to T).
template <typename T, Activation A>
struct RecomputeDzEpilogue {
  T* __restrict__ dz;
  int64_t lddz;
  const T* __restrict__ dy;
  int64_t lddy;
  const T* __restrict__ bias;
  acc_t<T> a;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, acc_t<T> z) const {
    if (bias != nullptr) z += Num<T>::to_acc(bias[c]);
    dz[r * lddz + c] = dz_from_preact<T, A>(dy[r * lddy + c], z, a);
  }
  __device__ __forceinline__ const RecomputeDzEpilogue& for_split(unsigned) const { return *this; }
};

template <typename T>
struct StoreEpilogue {
  T* __restrict__ out;
  int64_t ldo;
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, acc_t<T> v) const {
    out[r * ldo + c] = Num<T>::from_acc(v);
  }
  __device__ __forceinline__ const StoreEpilogue& for_split(unsigned) const { return *this; }
};

// Split-K: block z of the grid writes its partial sums to slice z of an accumulation-type
// workspace; splitk_reduce_kernel then adds the slices in order (deterministic, no atomics) and
// hands each full sum to the GEMM's own epilogue (bias, activation, dZ: not linear in the sum).
template <typename Acc>
struct SplitPartialEpilogue {
  Acc* __restrict__ ws;
  int64_t ld;     // columns of the output
  int64_t slice;  // rows * ld
  __device__ __forceinline__ void operator()(int64_t r, int64_t c, Acc v) const { ws[r * ld + c] = v; }
  __device__ __forceinline__ SplitPartialEpilogue for_split(unsigned z) const {
    return SplitPartialEpilogue{ws + static_cast<int64_t>(z) * slice, ld, slice};
  }
};

constexpr int kReduceThreads = 256;

template <typename T, class Epi>
__global__ void __launch_bounds__(kReduceThreads)
    splitk_reduce_kernel(const acc_t<T>* __restrict__ ws, int64_t splits, int64_t rows, int64_t cols, Epi epi) {
  const int64_t total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kReduceThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < total; i += stride) {
    acc_t<T> s = ws[i];
    for (int64_t z = 1; z < splits; ++z) s += ws[z * total + i];
    epi(i / cols, i % cols, s);
  }
}

// Calls the epilogue on a ROWS x COLS slab of accumulators staged in shared memory (`at(rr, cc)`
// reads slab element (rr, cc), the output element (row0 + rr * row_step, n0 + cc)), the lanes of
// a warp on consecutive columns: coalesced stores (and bias / dY reads).
template <int ROWS, int COLS, int NT, class At, class Epi>
__device__ __forceinline__ void epilogue_slab(const At& at, const Epi& e, int64_t row0, int row_step, int64_t n0,
                                              int64_t M, int64_t N, int tid) {
#pragma unroll 4
  for (int idx = tid; idx < ROWS * COLS; idx += NT) {
    const int rr = idx / COLS, cc = idx % COLS;
    const int64_t r = row0 + static_cast<int64_t>(rr) * row_step, c = n0 + cc;
    if (r < M && c < N) e(r, c, at(rr, cc));
  }
}

// ------------------------------------------------------------------------------------------
// FMA-path tiled GEMM (float32, float64): C[M,N] = A[M,red] . B[N,red]^T, epilogue fused.
// Block tile BM x BN, k-step BK, each thread a TM x TN register block, 256 threads.
// ------------------------------------------------------------------------------------------
template <typename T_, int BM_, int BN_, int BK_, int TM_, int TN_, int PAD_, int MIN_BLOCKS_>
struct FmaTile {
  using T = T_;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, PAD = PAD_;
  static constexpr int NT = (BM / TM) * (BN / TN);
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
};
// float32, wide outputs: 64 accumulators + 16 operands per thread need ~150-170 registers;
// capping at 128 (2 blocks/SM) spills, so one 256-thread block per SM, with 64 independent
// FMAs per k step for latency.
using FmaF32Wide = FmaTile<float, 128, 128, 8, 8, 8, 4, 1>;
// float32, outputs with at most 64 rows or columns (the dW / forward of narrow layers), where
// a 128-wide tile would compute mostly padding.
using FmaF32Narrow = FmaTile<float, 64, 64, 16, 4, 4, 4, 2>;
using FmaF64 = FmaTile<double, 64, 64, 8, 4, 4, 2, 2>;

// The FMA kernel's shared memory: the k-major operand tiles, or (after the k loop) one slab of
// the epilogue: row i of every thread's TM x TN block, (BM/TM) x BN accumulators. A thread's TN
// accumulators are CH 16-byte chunks, each one 16-byte store (uint4: STS.128); slab_chunk swaps
// the chunks of every other group of 4 threads (chunk q goes to q ^ ((q / 8) & (CH - 1))), so
// the 8 lanes of a store phase hit 8 distinct bank quads instead of two lanes per quad, and a
// warp's 32 consecutive columns (the read-back) still lie in one aligned group of chunks: both
// sides free of bank conflicts.
template <class Cfg>
struct __align__(16) FmaSmem {
  using T = typename Cfg::T;
  using Acc = acc_t<T>;
  static constexpr int EPC = 16 / static_cast<int>(sizeof(Acc));  // accumulators per chunk
  static constexpr int CH = Cfg::TN / EPC;
  static_assert(Cfg::TN % EPC == 0 && (CH == 1 || CH == 2 || CH == 4 || CH == 8), "whole 16-byte chunks per thread");
  union {
    struct {
      T a[Cfg::BK * (Cfg::BM + Cfg::PAD)];
      T b[Cfg::BK * (Cfg::BN + Cfg::PAD)];
    } ab;
    Acc slab[(Cfg::BM / Cfg::TM) * Cfg::BN];
  };
  static constexpr int slab_chunk(int q) { return q ^ ((q / 8) & (CH - 1)); }
  static constexpr int slab_col(int c) { return slab_chunk(c / EPC) * EPC + c % EPC; }
};

// Takes the banks of `n` 4-byte words from `word` for one shared-memory phase; false on a conflict.
constexpr bool take_banks(bool (&bank)[32], int word, int n) {
  for (int w = 0; w < n; ++w) {
    if (bank[(word + w) % 32]) return false;
    bank[(word + w) % 32] = true;
  }
  return true;
}

// The slab accesses of gemm_fma_kernel, phase by phase (128 bytes: 8 lanes of a 16-byte store,
// 32 or 16 lanes of a 4- or 8-byte load): no bank serves two lanes of a phase.
template <class Cfg>
constexpr bool slab_free_of_bank_conflicts() {
  using S = FmaSmem<Cfg>;
  constexpr int W = static_cast<int>(sizeof(typename S::Acc)) / 4, TX = Cfg::BN / Cfg::TN;
  for (int h = 0; h < S::CH; ++h) {
    for (int p0 = 0; p0 < Cfg::NT; p0 += 8) {  // thread t = ty * TX + tx stores its chunk h
      bool bank[32] = {};
      for (int t = p0; t < p0 + 8; ++t)
        if (!take_banks(bank, ((t / TX) * Cfg::BN + S::slab_col((t % TX) * Cfg::TN + h * S::EPC)) * W, 4)) return false;
    }
  }
  for (int c0 = 0; c0 < Cfg::BN; c0 += 32 / W) {  // a warp reads 32 consecutive columns of a row
    bool bank[32] = {};
    for (int c = c0; c < c0 + 32 / W; ++c)
      if (!take_banks(bank, S::slab_col(c) * W, W)) return false;
  }
  return true;
}

template <class Cfg, class AOp, class BOp, class Epi>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MIN_BLOCKS)
    gemm_fma_kernel(AOp a, BOp b, Epi epi, int64_t M, int64_t N, int64_t red, int64_t n_base, int64_t split_len) {
  using C = Cfg;
  using T = typename Cfg::T;
  using Acc = acc_t<T>;
  constexpr int LDA = C::BM + C::PAD, LDB = C::BN + C::PAD;
  using Smem = FmaSmem<Cfg>;
  static_assert(slab_free_of_bank_conflicts<Cfg>(), "the epilogue slab's accesses conflict on shared-memory banks");
  FB_SHARED_OBJECT(Smem, sm);
  T* const As = sm.ab.a;
  T* const Bs = sm.ab.b;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % (C::BN / C::TN);
  const int ty = tid / (C::BN / C::TN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int64_t n0 = n_base + static_cast<int64_t>(blockIdx.y) * C::BN;

  Acc acc[C::TM][C::TN];
#pragma unroll
  for (int i = 0; i < C::TM; ++i)
#pragma unroll
    for (int j = 0; j < C::TN; ++j) acc[i][j] = Acc(0);

  const auto [k_begin, k_end, al, bl] = split_k_slice(a, b, split_len, red);
  const auto e = epi.for_split(blockIdx.z);
  const bool row_sums = kRowSums<AOp> && blockIdx.y == 0 && n_base == 0;  // uniform over the block
  Acc rs = Acc(0);

  TileRegs<C::BM, C::BK, C::NT, T> ta;
  TileRegs<C::BN, C::BK, C::NT, T> tb;
  if (k_begin < k_end) {
    fetch_tile(al, ta, m0, k_begin, tid);
    fetch_tile(bl, tb, n0, k_begin, tid);
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += C::BK) {
    store_tile<C::BM, C::BK, C::NT, true, LDA, AOp::kKContig>(ta, As, tid);
    store_tile<C::BN, C::BK, C::NT, true, LDB, BOp::kKContig>(tb, Bs, tid);
    __syncthreads();
    if (k0 + C::BK < k_end) {  // next tile's global loads overlap this tile's FMAs
      fetch_tile(al, ta, m0, k0 + C::BK, tid);
      fetch_tile(bl, tb, n0, k0 + C::BK, tid);
    }
    if constexpr (kRowSums<AOp>) {
      if (row_sums) add_row_sums<C::BM, C::BK, C::NT>(As, LDA, tid, rs);
    }
#pragma unroll
    for (int kk = 0; kk < C::BK; ++kk) {
      Acc ra[C::TM], rb[C::TN];
#pragma unroll
      for (int i = 0; i < C::TM; ++i) ra[i] = Num<T>::to_acc(As[kk * LDA + ty * C::TM + i]);
#pragma unroll
      for (int j = 0; j < C::TN; ++j) rb[j] = Num<T>::to_acc(Bs[kk * LDB + tx * C::TN + j]);
#pragma unroll
      for (int i = 0; i < C::TM; ++i)
#pragma unroll
        for (int j = 0; j < C::TN; ++j) acc[i][j] = ra[i] * rb[j] + acc[i][j];
    }
    __syncthreads();
  }

  if constexpr (kRowSums<AOp>) {
    if (row_sums) store_row_sums<C::BM, C::NT>(a, rs, m0, M, tid);
  }
  // Epilogue through shared memory, one register row at a time (the operand tiles are dead: last
  // barrier above), so a warp's lanes store consecutive columns instead of columns TN apart.
  constexpr int EPC = Smem::EPC, SR = C::BM / C::TM;
#pragma unroll
  for (int i = 0; i < C::TM; ++i) {
    if (i > 0) __syncthreads();  // the previous slab has been read
#pragma unroll
    for (int h = 0; h < Smem::CH; ++h) {
      Vec16<Acc, EPC> v;
#pragma unroll
      for (int j = 0; j < EPC; ++j) v.v[j] = acc[i][h * EPC + j];
      reinterpret_cast<uint4*>(sm.slab)[(ty * C::BN) / EPC + Smem::slab_chunk(tx * Smem::CH + h)] = v.u;
    }
    __syncthreads();
    epilogue_slab<SR, C::BN, C::NT>([&](int rr, int cc) { return sm.slab[rr * C::BN + Smem::slab_col(cc)]; }, e,
                                    m0 + i, C::TM, n0, M, N, tid);
  }
}

// ------------------------------------------------------------------------------------------
// Tensor-core tiled GEMM (float16, bfloat16) through nvcuda::wmma, fp32 accumulation.
// Block tile 64 x 64 x 32, four warps in 2 x 2, each warp 32 x 32 = 2 x 2 fragments of 16x16.
// Each operand tile sits in shared memory as it lies in global memory (WmmaTile), so the tile
// writes are 16-byte vectors and the fragments' layout absorbs the transpose (ldmatrix.trans).
// The operand tiles form a STAGES-deep ring: an operand that is copied as it is (PlainOperand,
// 16-byte aligned) streams in by cp.async, tile k + STAGES - 1 in flight while tile k is
// multiplied; one whose tile is computed (dZ from dY and the saved y / z) or misaligned is
// register-staged one tile ahead into the ring. The accumulators go through shared memory
// (aliasing the ring) to the epilogue.
// ------------------------------------------------------------------------------------------
struct WmmaConfig {
  static constexpr int BM = 64, BN = 64, BK = 32, WM = 32, WN = 32, PAD = 8, CPAD = 8;
  // 3 stages: 27-30 KB of static shared memory (within the 48 KB of static shared memory), so
  // registers (<= 168: 3 blocks/SM), not shared memory, bound the occupancy
  static constexpr int STAGES = 3;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int NT = WARPS_M * WARPS_N * 32;  // 128
  // floats; store_matrix_sync writes an accumulator as 64-bit stores, lane l at row l/4 and
  // columns 2(l%4), +1: a row stride of 8 banks (mod 32) puts the 4 rows of a 16-lane phase on
  // distinct banks (BN + 4 would overlap rows g and g+1 on 4 banks: 2-way conflicts).
  static constexpr int LDC = BN + CPAD;
};

// The shared tile of a BR x BK operand: r-major [BR][BK + PAD] when the operand is contiguous
// along k, k-major [BK][BR + PAD] when along r. PAD keeps rows 16-byte aligned and puts the 8
// rows of an ldmatrix phase on distinct banks. A (m, k) and B (k, n) fragments read it as
// row_major / col_major (r-major) or col_major / row_major (k-major).
template <int BR, bool KC>
struct WmmaTile {
  static constexpr int BK = WmmaConfig::BK, PAD = WmmaConfig::PAD;
  static constexpr int ld = KC ? BK + PAD : BR + PAD;
  static constexpr int size = KC ? BR * ld : BK * ld;
  using a_layout = std::conditional_t<KC, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using b_layout = std::conditional_t<KC, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  static __device__ __forceinline__ int at(int r, int k) { return KC ? r * ld + k : k * ld + r; }
};

template <typename T, class TA, class TB>
struct __align__(32) WmmaSmem {
  union {
    struct {
      T a[WmmaConfig::STAGES][TA::size];
      T b[WmmaConfig::STAGES][TB::size];
    } ab;
    float c[WmmaConfig::BM * WmmaConfig::LDC];
  };
};

// One operand's side of the ring: cp.async for an aligned PlainOperand (`async`, uniform over
// the grid), else fetch_tile into registers one tile ahead and store_tile after the MMAs.
template <int BR, class Op, typename T>
struct WmmaRing {
  using Tile = WmmaTile<BR, Op::kKContig>;
  static constexpr int BK = WmmaConfig::BK, NT = WmmaConfig::NT;
  const Op& op;
  T (*stage)[Tile::size];
  int64_t r0;
  bool async;
  TileRegs<BR, BK, NT, T> regs;

  __device__ __forceinline__ void copy(int s, int64_t k0, int tid) {
    if constexpr (Op::kAsync) copy_tile_async<BR, BK, NT, Tile>(op, stage[s], r0, k0, tid);
  }
  __device__ __forceinline__ void fetch(int64_t k0, int tid) { fetch_tile(op, regs, r0, k0, tid); }
  __device__ __forceinline__ void store(int s, int tid) {
    store_tile<BR, BK, NT, !Op::kKContig, Tile::ld, Op::kKContig>(regs, stage[s], tid);
  }
};

// At least 3 blocks (12 warps) per SM, so at most 168 registers: at 4 blocks (128 registers) the
// dW kernels, which hold the ring's addresses beside the register-staged dZ tile (gelu's act'
// and the row sums), spill; without a bound ptxas aims lower still. The cp.async ring, not more
// resident warps, hides the global latency.
template <typename T, class AOp, class BOp, class Epi>
__global__ void __launch_bounds__(WmmaConfig::NT, 3)
    gemm_wmma_kernel(AOp a, BOp b, Epi epi, int64_t M, int64_t N, int64_t red, int64_t n_base, int64_t split_len) {
  using namespace nvcuda;
  using C = WmmaConfig;
  using TA = WmmaTile<C::BM, AOp::kKContig>;
  using TB = WmmaTile<C::BN, BOp::kKContig>;
  using Smem = WmmaSmem<T, TA, TB>;
  constexpr int FM = C::WM / 16, FN = C::WN / 16, S = C::STAGES;
  static_assert(S >= 2, "a ring of at least two stages");
  FB_SHARED_OBJECT(Smem, sm);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int wm = warp / C::WARPS_N;
  const int wn = warp % C::WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int64_t n0 = n_base + static_cast<int64_t>(blockIdx.y) * C::BN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(fc[i][j], 0.0f);

  const auto [k_begin, k_end, al, bl] = split_k_slice(a, b, split_len, red);
  const auto e = epi.for_split(blockIdx.z);
  static_assert(!kRowSums<AOp> || !AOp::kKContig, "row sums read a k-major A tile");
  const bool row_sums = kRowSums<AOp> && blockIdx.y == 0 && n_base == 0;  // uniform over the block
  float rs = 0.0f;

  WmmaRing<C::BM, AOp, T> ra{al, sm.ab.a, m0, AOp::kAsync && al.vec, {}};
  WmmaRing<C::BN, BOp, T> rb{bl, sm.ab.b, n0, BOp::kAsync && bl.vec, {}};
  // Prologue: tiles 0 .. S-2 in flight (one commit group each, empty ones included, so that
  // group g always holds tile g), tile 0 of a register-staged operand in place.
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (k_begin + s * C::BK < k_end) {
      if (ra.async) ra.copy(s, k_begin + s * C::BK, tid);
      if (rb.async) rb.copy(s, k_begin + s * C::BK, tid);
    }
    FB_CP_ASYNC_COMMIT();
  }
  if (k_begin < k_end) {
    if (!ra.async) ra.fetch(k_begin, tid);
    if (!rb.async) rb.fetch(k_begin, tid);
    if (!ra.async) ra.store(0, tid);
    if (!rb.async) rb.store(0, tid);
  }
  int cur = 0;  // the stage of the tile at k0; the tile S - 1 steps ahead goes to the stage before it
  for (int64_t k0 = k_begin; k0 < k_end; k0 += C::BK) {
    FB_CP_ASYNC_WAIT(S - 2);  // this thread's copies of tile k0 have landed (S - 2 newer groups may fly)
    // Everybody's copies and register stores of tile k0 are visible, and every warp is done with
    // the previous tile, whose stage the next copy overwrites.
    __syncthreads();
    const int last = cur == 0 ? S - 1 : cur - 1;
    if (k0 + (S - 1) * C::BK < k_end) {
      if (ra.async) ra.copy(last, k0 + (S - 1) * C::BK, tid);
      if (rb.async) rb.copy(last, k0 + (S - 1) * C::BK, tid);
    }
    FB_CP_ASYNC_COMMIT();
    const bool more = k0 + C::BK < k_end;
    const int next = cur == S - 1 ? 0 : cur + 1;
    if (more) {  // the register-staged operands' next tile: global loads under this tile's MMAs
      if (!ra.async) ra.fetch(k0 + C::BK, tid);
      if (!rb.async) rb.fetch(k0 + C::BK, tid);
    }
    const T* As = sm.ab.a[cur];
    const T* Bs = sm.ab.b[cur];
    if constexpr (kRowSums<AOp>) {
      if (row_sums) add_row_sums<C::BM, C::BK, C::NT>(As, TA::ld, tid, rs);
    }
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, typename TA::a_layout> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, typename TB::b_layout> fb[FN];
#pragma unroll
      for (int i2 = 0; i2 < FM; ++i2) wmma::load_matrix_sync(fa[i2], &As[TA::at(wm * C::WM + i2 * 16, kk)], TA::ld);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], &Bs[TB::at(wn * C::WN + j * 16, kk)], TB::ld);
#pragma unroll
      for (int i2 = 0; i2 < FM; ++i2)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(fc[i2][j], fa[i2], fb[j], fc[i2][j]);
    }
    if (more) {  // stage `next` was last read S - 1 steps ago, before this step's barrier
      if (!ra.async) ra.store(next, tid);
      if (!rb.async) rb.store(next, tid);
    }
    cur = next;
  }
  FB_CP_ASYNC_WAIT(0);  // (only empty groups are left)

  if constexpr (kRowSums<AOp>) {
    if (row_sums) store_row_sums<C::BM, C::NT>(a, rs, m0, M, tid);
  }
  __syncthreads();  // every warp is done with the ring: its space takes the accumulators
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(&sm.c[(wm * C::WM + i * 16) * C::LDC + wn * C::WN + j * 16], fc[i][j], C::LDC,
                              wmma::mem_row_major);
  __syncthreads();
  epilogue_slab<C::BM, C::BN, C::NT>([&](int rr, int cc) { return sm.c[rr * C::LDC + cc]; }, e, m0, 1, n0, M, N, tid);
}

// ------------------------------------------------------------------------------------------
// Bias gradient: deterministic two-stage column reduction of dZ, no atomics.
// Stage 1: block (column chunk of 32, row block) sums its rows in a fixed order; 8 row groups
// are combined through shared memory in a fixed order; one partial per (row block, column).
// Stage 2: one warp per column sums the partials, lane-strided then a __shfl_down_sync tree.
// The row blocking depends on M only, so the result is bitwise reproducible.
// ------------------------------------------------------------------------------------------
constexpr int kDbCols = 32, kDbGroups = 8, kDbThreads = kDbCols * kDbGroups;
constexpr int64_t kDbMinRowsPerBlock = 256, kDbMaxRowBlocks = 4096;

inline int64_t db_rows_per_block(int64_t M) {
  int64_t rpb = (M + kDbMaxRowBlocks - 1) / kDbMaxRowBlocks;
  rpb = rpb < kDbMinRowsPerBlock ? kDbMinRowsPerBlock : rpb;
  return (rpb + kDbGroups - 1) / kDbGroups * kDbGroups;
}
inline int64_t db_row_blocks(int64_t M) {
  const int64_t rpb = db_rows_per_block(M);
  return (M + rpb - 1) / rpb;
}

// db_partial_kernel's elements: dZ from dY and the saved y or z, or a dZ in memory. kRowUnroll:
// how far the kernel unrolls its row loop; not at all where act' is transcendental (the saved z of
// gelu, gelu_tanh, silu), whose unrolled bodies ptxas spills (double gelu_tanh on sm_90).
template <typename T, Activation A>
struct DzFromSavedElem {
  static constexpr int kRowUnroll = kSaved<A> == Saved::Preact ? 1 : 4;
  const T* __restrict__ dy;
  int64_t lddy;
  const T* __restrict__ saved;
  int64_t lds;
  acc_t<T> a;
  __device__ __forceinline__ acc_t<T> operator()(int64_t r, int64_t c) const {
    return Num<T>::to_acc(dz_from_saved<T, A>(dy[r * lddy + c], saved[r * lds + c], a));
  }
};

template <typename T>
struct PlainElem {
  static constexpr int kRowUnroll = 4;
  const T* __restrict__ p;
  int64_t ld;
  __device__ __forceinline__ acc_t<T> operator()(int64_t r, int64_t c) const { return Num<T>::to_acc(p[r * ld + c]); }
};

template <typename T, class Elem>
__global__ void __launch_bounds__(kDbThreads)
    db_partial_kernel(Elem dz, int64_t M, int64_t N, int64_t rows_per_block, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  FB_SHARED_ARRAY(Acc, red, kDbGroups * kDbCols);
  const int lane = static_cast<int>(threadIdx.x) % kDbCols;
  const int group = static_cast<int>(threadIdx.x) / kDbCols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kDbCols + lane;
  const int64_t rb = blockIdx.y;
  const int64_t r_begin = rb * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < M ? r_begin + rows_per_block : M;
  Acc s = Acc(0);
  if (c < N) {
#pragma unroll Elem::kRowUnroll
    for (int64_t r = r_begin + group; r < r_end; r += kDbGroups) s += dz(r, c);
  }
  red[group * kDbCols + lane] = s;
  __syncthreads();
  if (group == 0 && c < N) {
    Acc t = red[lane];
#pragma unroll
    for (int g = 1; g < kDbGroups; ++g) t += red[g * kDbCols + lane];
    partial[rb * N + c] = t;
  }
}

constexpr int kDbFinalThreads = 256, kDbFinalColsPerBlock = kDbFinalThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kDbFinalThreads)
    db_finalize_kernel(const acc_t<T>* __restrict__ partial, int64_t row_blocks, int64_t N, T* __restrict__ db) {
  using Acc = acc_t<T>;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kDbFinalColsPerBlock + static_cast<int>(threadIdx.x) / 32;
  if (c >= N) return;  // whole warps leave together; no block barrier follows
  Acc s = Acc(0);
  for (int64_t j = lane; j < row_blocks; j += 32) s += partial[j * N + c];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) db[c] = Num<T>::from_acc(s);
}

// ------------------------------------------------------------------------------------------
// Host-side launchers (grid shapes, path choice, workspace), shared by the torch glue and the
// harness.
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
#define FB_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#else
#define FB_LAUNCH(kernel, grid, block, stream, ...) ::cuda_host::launch((grid), (block), kernel, __VA_ARGS__)
#endif

namespace detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-byte vector accesses are legal when the base is 16-byte aligned and every row starts and
// ends on a vector boundary.
template <typename T>
inline bool vec_ok(const T* p, int64_t ld, int64_t contiguous_extent) {
  constexpr int V = kVec<T>;
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % V == 0 && contiguous_extent % V == 0;
}

constexpr int64_t kMaxGridY = 65535;

// Calls f.template operator()<Cfg>() with the GEMM configuration for a rows x cols output.
template <typename T, class F>
decltype(auto) with_gemm_config(int64_t rows, int64_t cols, F&& f) {
  if constexpr (kTensorCore<T>) {
    return f.template operator()<WmmaConfig>();
  } else if constexpr (std::is_same_v<T, double>) {
    return f.template operator()<FmaF64>();
  } else {
    if (rows <= FmaF32Narrow::BM || cols <= FmaF32Narrow::BN) return f.template operator()<FmaF32Narrow>();
    return f.template operator()<FmaF32Wide>();
  }
}

template <typename T, class Cfg, class AOp, class BOp, class Epi>
void run_gemm(const AOp& a, const BOp& b, const Epi& epi, int64_t M, int64_t N, int64_t red, cudaStream_t stream,
              LaunchCheck check, int64_t splits = 1, int64_t split_len = 0) {
  if (M == 0 || N == 0) return;
  if (splits <= 1) split_len = red > 0 ? red : 1;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = Cfg::NT;
  const int64_t tiles_n = ceil_div(N, BN);
  // grid.y is limited to 65535: very wide outputs are covered by several launches.
  for (int64_t t0 = 0; t0 < tiles_n; t0 += kMaxGridY) {
    const int64_t tn = tiles_n - t0 < kMaxGridY ? tiles_n - t0 : kMaxGridY;
    const dim3 grid(static_cast<unsigned>(ceil_div(M, BM)), static_cast<unsigned>(tn),
                    static_cast<unsigned>(splits > 1 ? splits : 1));
    const dim3 block(NT);
    if constexpr (kTensorCore<T>) {
      auto* kernel = &gemm_wmma_kernel<T, AOp, BOp, Epi>;
      FB_LAUNCH(kernel, grid, block, stream, a, b, epi, M, N, red, t0 * BN, split_len);
    } else {
      auto* kernel = &gemm_fma_kernel<Cfg, AOp, BOp, Epi>;
      FB_LAUNCH(kernel, grid, block, stream, a, b, epi, M, N, red, t0 * BN, split_len);
    }
    check();
  }
}

// Split-K plan of every GEMM (forward, recompute dZ, dX, dW): when the output has too few tiles
// to fill the GPU and the reduction is long (dW of a tall-skinny layer: a small N x K output
// reduced over all M rows; the forward of a short batch through a wide layer), the reduction is
// cut into `splits` chunks of `split_len` (a multiple of BK, at least kSplitMinSteps k-steps).
// A pure function of the shape, so results are reproducible on any GPU; the target of two waves
// of 132 SMs (H100) also fills 108 (A100) to >= 75% in every wave but the partial last one.
constexpr int64_t kSplitTargetBlocks = 264;  // two waves of 132 SMs
constexpr int64_t kSplitMaxSplits = 256;
constexpr int64_t kSplitMinSteps = 4;

struct SplitPlan {
  int64_t splits = 1, split_len = 0;
};

template <class Cfg>
SplitPlan split_plan(int64_t rows, int64_t cols, int64_t red) {
  SplitPlan p;
  p.split_len = red;
  const int64_t tiles = ceil_div(rows, Cfg::BM) * ceil_div(cols, Cfg::BN);
  if (rows == 0 || cols == 0 || tiles >= kSplitTargetBlocks) return p;
  const int64_t min_len = kSplitMinSteps * Cfg::BK;
  int64_t s = kSplitTargetBlocks / tiles;  // never more blocks than the target: no ragged last wave
  s = s < kSplitMaxSplits ? s : kSplitMaxSplits;
  const int64_t by_len = ceil_div(red, min_len);
  s = s < by_len ? s : by_len;
  if (s <= 1) return p;
  p.split_len = ceil_div(ceil_div(red, s), Cfg::BK) * Cfg::BK;
  p.splits = ceil_div(red, p.split_len);
  return p;
}

template <typename T>
size_t split_workspace_bytes(int64_t rows, int64_t cols, int64_t red) {
  const SplitPlan p = with_gemm_config<T>(rows, cols, [&]<class Cfg>() { return split_plan<Cfg>(rows, cols, red); });
  return p.splits > 1 ? static_cast<size_t>(p.splits * rows * cols) * sizeof(acc_t<T>) : 0;
}

// epi(A . B^T) for a rows x cols output, split over the reduction when that helps: the splits'
// partial sums are added before the epilogue (split_ws: split_workspace_bytes<T>(rows, cols, red)).
template <typename T, class AOp, class BOp, class Epi>
void run_split_gemm(const AOp& a, const BOp& b, const Epi& epi, int64_t rows, int64_t cols, int64_t red,
                    void* split_ws, cudaStream_t stream, LaunchCheck check) {
  if (rows == 0 || cols == 0) return;
  bool split = false;
  int64_t splits = 1;
  with_gemm_config<T>(rows, cols, [&]<class Cfg>() {
    const SplitPlan p = split_plan<Cfg>(rows, cols, red);
    splits = p.splits;
    if (p.splits <= 1) {
      run_gemm<T, Cfg>(a, b, epi, rows, cols, red, stream, check);
      return;
    }
    split = true;
    run_gemm<T, Cfg>(a, b, SplitPartialEpilogue<acc_t<T>>{static_cast<acc_t<T>*>(split_ws), cols, rows * cols}, rows,
                     cols, red, stream, check, p.splits, p.split_len);
  });
  if (!split) return;
  auto* ws = static_cast<acc_t<T>*>(split_ws);
  const int64_t total = rows * cols;
  int64_t blocks = ceil_div(total, kReduceThreads);
  blocks = blocks < 4096 ? blocks : 4096;
  auto* kernel = &splitk_reduce_kernel<T, Epi>;
  FB_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads), stream,
            static_cast<const acc_t<T>*>(ws), splits, rows, cols, epi);
  check();
}

template <typename T, class Elem>
void run_bias_grad(const Elem& dz, int64_t M, int64_t N, acc_t<T>* partial, T* db, cudaStream_t stream,
                   LaunchCheck check) {
  if (N == 0) return;
  const int64_t rpb = db_rows_per_block(M);
  const int64_t rblocks = db_row_blocks(M);
  {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kDbCols)), static_cast<unsigned>(rblocks));
    auto* kernel = &db_partial_kernel<T, Elem>;
    FB_LAUNCH(kernel, grid, dim3(kDbThreads), stream, dz, M, N, rpb, partial);
    check();
  }
  {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kDbFinalColsPerBlock)));
    auto* kernel = &db_finalize_kernel<T>;
    FB_LAUNCH(kernel, grid, dim3(kDbFinalThreads), stream, static_cast<const acc_t<T>*>(partial), rblocks, N, db);
    check();
  }
}

inline size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// The db partials the dW GEMM writes when db is folded into it: P per split of its plan.
template <typename T>
int64_t db_fold_parts(int64_t N, int64_t K, int64_t M) {
  return with_gemm_config<T>(N, K, [&]<class Cfg>() {
    return kRowSumParts<Cfg::BM, Cfg::NT> * split_plan<Cfg>(N, K, M).splits;
  });
}

// dX, dW and db from a dZ operand pair (the same dZ read as k-contiguous for dX, row-contiguous
// for dW); db is folded into dW when both are wanted (db_partial: the partials' workspace),
// else reduced from `db_elem` by the db kernels.
template <typename T, class DzK, class DzR, class DbElem>
void run_dz_grads(const BwdProblem<T>& p, const DzK& dz_k, const DzR& dz_r, const DbElem& db_elem,
                  acc_t<T>* db_partial, void* split_ws, cudaStream_t stream, LaunchCheck check) {
  if (p.dx != nullptr) {
    // dX[M,K] = dZ[M,N] . W[N,K]: B(k, n) = W[n, k] is contiguous along its rows.
    const PlainOperand<T, false> w{p.w, p.ldw, p.K, p.N, vec_ok(p.w, p.ldw, p.K)};
    run_split_gemm<T>(dz_k, w, StoreEpilogue<T>{p.dx, p.lddx}, p.M, p.K, p.N, split_ws, stream, check);
  }
  if (p.dw != nullptr) {
    // dW[N,K] = dZ^T[N,M] . x[M,K]: B(k, m) = x[m, k] is contiguous along its rows.
    const PlainOperand<T, false> x{p.x, p.ldx, p.K, p.M, vec_ok(p.x, p.ldx, p.K)};
    const StoreEpilogue<T> out{p.dw, p.lddw};
    if (p.db == nullptr) {
      run_split_gemm<T>(dz_r, x, out, p.N, p.K, p.M, split_ws, stream, check);
      return;
    }
    run_split_gemm<T>(RowSumOperand<T, DzR>{dz_r, db_partial}, x, out, p.N, p.K, p.M, split_ws, stream, check);
    const int64_t parts = db_fold_parts<T>(p.N, p.K, p.M);
    auto* kernel = &db_finalize_kernel<T>;
    FB_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(p.N, kDbFinalColsPerBlock))), dim3(kDbFinalThreads), stream,
              static_cast<const acc_t<T>*>(db_partial), parts, p.N, p.db);
    check();
    return;
  }
  if (p.db != nullptr) run_bias_grad<T>(db_elem, p.M, p.N, db_partial, p.db, stream, check);
}

// Workspace layout: [dZ (recompute)] [db partials] [split-K slices (shared by the recompute
// GEMM, dX and dW, which run one after the other on the stream)], each 256-byte aligned.
struct BwdWorkspace {
  size_t dz = 0, db = 0, split = 0;
  size_t dz_off = 0, db_off = 0, split_off = 0, total = 0;
};

template <typename T>
BwdWorkspace bwd_workspace(int64_t M, int64_t N, int64_t K, bool recompute, bool need_dx, bool need_dw,
                           bool need_db) {
  BwdWorkspace w;
  if (M == 0 || N == 0) return w;
  if (recompute) w.dz = static_cast<size_t>(M) * static_cast<size_t>(N) * sizeof(T);
  if (need_db) {
    const int64_t parts = need_dw ? db_fold_parts<T>(N, K, M) : db_row_blocks(M);
    w.db = static_cast<size_t>(parts) * static_cast<size_t>(N) * sizeof(acc_t<T>);
  }
  const size_t sx = need_dx ? split_workspace_bytes<T>(M, K, N) : 0;
  const size_t sw = need_dw ? split_workspace_bytes<T>(N, K, M) : 0;
  const size_t sz = recompute ? split_workspace_bytes<T>(M, N, K) : 0;
  w.split = sx > sw ? sx : sw;
  w.split = w.split > sz ? w.split : sz;
  w.dz_off = 0;
  w.db_off = align_up(w.dz);
  w.split_off = w.db_off + align_up(w.db);
  w.total = w.split_off + w.split;
  return w;
}

}  // namespace detail

template <typename T>
size_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, bool recompute, bool need_dx, bool need_dw,
                           bool need_db) {
  return detail::bwd_workspace<T>(M, N, K, recompute, need_dx, need_dw, need_db).total;
}

template <typename T>
size_t fwd_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  return M == 0 || N == 0 ? 0 : detail::split_workspace_bytes<T>(M, N, K);
}

template <typename T, Activation A>
void launch_forward(const FwdProblem<T>& p, cudaStream_t stream, LaunchCheck check) {
  using namespace detail;
  if (p.M == 0 || p.N == 0) return;
  const PlainOperand<T, true> x{p.x, p.ldx, p.M, p.K, vec_ok(p.x, p.ldx, p.K)};
  const PlainOperand<T, true> w{p.w, p.ldw, p.N, p.K, vec_ok(p.w, p.ldw, p.K)};
  run_split_gemm<T>(x, w, ForwardEpilogue<T, A>{p.out, p.ldo, p.preact, p.ldp, p.bias, p.a}, p.M, p.N, p.K,
                    p.workspace, stream, check);
}

template <typename T, Activation A>
void launch_backward(const BwdProblem<T>& p, cudaStream_t stream, LaunchCheck check) {
  using namespace detail;
  // The glue fills dw/db with zeros for M = 0 and dx for N = 0.
  if (p.M == 0 || p.N == 0) return;
  const bool recompute = p.saved == nullptr;
  const BwdWorkspace wl =
      bwd_workspace<T>(p.M, p.N, p.K, recompute, p.dx != nullptr, p.dw != nullptr, p.db != nullptr);
  char* ws = static_cast<char*>(p.workspace);
  auto* db_partial = reinterpret_cast<acc_t<T>*>(ws + wl.db_off);
  void* split_ws = ws + wl.split_off;
  if (!recompute) {
    const bool v = vec_ok(p.dy, p.lddy, p.N) && vec_ok(p.saved, p.lds, p.N);
    const DzFromSavedOperand<T, A, true> dz_k{p.dy, p.lddy, p.saved, p.lds, p.M, p.N, v, p.a};
    const DzFromSavedOperand<T, A, false> dz_r{p.dy, p.lddy, p.saved, p.lds, p.N, p.M, v, p.a};
    run_dz_grads<T>(p, dz_k, dz_r, DzFromSavedElem<T, A>{p.dy, p.lddy, p.saved, p.lds, p.a}, db_partial, split_ws,
                    stream, check);
    return;
  }
  // Recompute: one GEMM recomputes Z = x W^T + b and writes dZ; the rest reads dZ.
  T* dz = reinterpret_cast<T*>(ws + wl.dz_off);
  {
    const PlainOperand<T, true> x{p.x, p.ldx, p.M, p.K, vec_ok(p.x, p.ldx, p.K)};
    const PlainOperand<T, true> w{p.w, p.ldw, p.N, p.K, vec_ok(p.w, p.ldw, p.K)};
    run_split_gemm<T>(x, w, RecomputeDzEpilogue<T, A>{dz, p.N, p.dy, p.lddy, p.bias, p.a}, p.M, p.N, p.K, split_ws,
                      stream, check);
  }
  const bool v = vec_ok(static_cast<const T*>(dz), p.N, p.N);
  const PlainOperand<T, true> dz_k{dz, p.N, p.M, p.N, v};
  const PlainOperand<T, false> dz_r{dz, p.N, p.N, p.M, v};
  run_dz_grads<T>(p, dz_k, dz_r, PlainElem<T>{dz, p.N}, db_partial, split_ws, stream, check);
}

}  // namespace fused_backprop::cuda
