// cuda_host.h: run CUDA kernel sources on the CPU with CUDA's execution model.
//
// Include this header before any kernel source and compile with g++ (C++20). Each CUDA thread
// of a block is a fiber (ucontext) with a stack of its own; blocks run one after another in a
// shuffled order; inside a block the runnable threads are resumed one at a time in a freshly
// shuffled order (seeded, so a run is reproducible) and each runs until it reaches a barrier,
// a warp collective, or its end. Consequences:
//   * a missing __syncthreads lets one thread read shared memory that the others have not
//     written yet (or have already overwritten): the result changes;
//   * threads of a block that reach different __syncthreads (by source line), or a barrier
//     that some threads skip by exiting, abort the run with a "divergent barrier" report;
//   * warp collectives (__shfl_*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp,
//     wmma::*_sync) complete only when every lane named in the mask has arrived at the same
//     collective with the same mask (and, for wmma, the same pointer / ldm / layout); anything
//     else aborts with a report.
// Shared memory: kernels declare it with CUDA_HOST_SHARED(T, name, n) / CUDA_HOST_SHARED_OBJECT
// (csrc/cuda/kernels.cuh maps its FB_SHARED_* macros to these, and to __shared__ under nvcc).
// Each is a fresh heap block per thread block: AddressSanitizer redzones catch out-of-bounds
// shared accesses, the block is freed when the thread block ends, and it starts filled with 0xff
// bytes (NaN in every floating type) so reading shared memory nobody wrote shows in the result.
// Plain `__shared__` also compiles (a function-local static, shared by the block because one
// block runs at a time) but is not poisoned, and GCC's ASan does not guard statics of templates.
//
// Covered (the complete list; kernels must use nothing else):
//   __global__ __device__ __host__ __forceinline__ __launch_bounds__ __restrict__ __align__(n)
//   __shared__ / CUDA_HOST_SHARED / CUDA_HOST_SHARED_OBJECT (static sizes; no extern dynamic shared memory)
//   dim3, uint3, uint4, threadIdx, blockIdx, blockDim, gridDim, warpSize, cudaStream_t
//   __syncthreads, __syncwarp, __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync,
//   __ballot_sync, __any_sync, __all_sync, atomicAdd, atomicSub, atomicMax, atomicMin, atomicExch, atomicCAS
//   __half, __nv_bfloat16 with __half2float, __float2half_rn, __bfloat162float, __float2bfloat16_rn
//   cp.async as cp_async_16 / cp_async_commit / cp_async_wait (kernels.cuh's FB_CP_ASYNC_*): copies are
//   queued per thread and performed only by the wait_group that completes their group, so reading
//   a stage too early reads the 0xff fill or stale data; copies not waited for at exit abort.
//   nvcuda::wmma: fragment<matrix_a|matrix_b|accumulator, 16, 16, 16, __half|__nv_bfloat16|float>,
//   row_major / col_major, fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync
//   (mem_row_major / mem_col_major). The fragment's element-to-lane mapping is this harness's own:
//   kernels may not depend on it (CUDA leaves it unspecified).
//   Launch: cuda_host::launch(grid, block, kernel, args...) in place of kernel<<<grid, block>>>.
// Environment: CUDA_HOST_SEED (default 1) seeds the schedule.
#pragma once

#define FB_CUDA_HOST_HARNESS 1

#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <new>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <sys/mman.h>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_HOST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_HOST_ASAN 1
#endif
#endif
#ifdef CUDA_HOST_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;
constexpr int warpSize = 32;

// Fiber switch. x86-64: a minimal callee-saved-register switch (ucontext's swapcontext makes a
// sigprocmask syscall per switch, and ASan's swapcontext interceptor re-clears the whole target
// stack's shadow each time); elsewhere ucontext.
#if defined(__x86_64__) && !defined(CUDA_HOST_USE_UCONTEXT)
#define CUDA_HOST_ASM_SWITCH 1
extern "C" void cuda_host_switch(void** save_sp, void* new_sp);
__asm__(R"(
    .text
    .p2align 4
    .globl cuda_host_switch
    .hidden cuda_host_switch
    .type cuda_host_switch,@function
cuda_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_host_switch, .-cuda_host_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace cuda_host {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "cuda_host: error: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

// ---- per-thread state -----------------------------------------------------------------------
enum class State { Runnable, AtBarrier, AtWarp, Done };

struct WarpReq;
using WarpFn = void (*)(WarpReq* const* lanes, unsigned mask);

// A lane's arrival at a warp collective. `fn` completes the collective for all lanes at once.
struct WarpReq {
  const char* what;
  unsigned mask;
  WarpFn fn;
  const void* key;  // must agree across lanes (wmma: the matrix pointer)
  long long key2;   // must agree across lanes (wmma: ldm/layout)
  int lane;
  // shuffles / votes
  uint64_t value;
  int src;
  int pred;
  // wmma
  void* d;
  const void* a;
  const void* b;
  const void* c;
  uint64_t result;
};

// A cp.async copy as issued: its 16 source bytes (read at issue, so ASan checks the source; the
// kernels never write what they copy) and where they go when the group is performed.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Thread {
  ucontext_t ctx;
  void* sp = nullptr;  // saved stack pointer (asm switch)
  char* stack = nullptr;
  size_t stack_size = 0;
  State state = State::Done;
  uint3 idx{0, 0, 0};
  int linear = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  WarpReq* req = nullptr;
  void* fake_stack = nullptr;
  std::vector<AsyncCopy> cp_open;                // cp.async copies issued since the last commit
  std::deque<std::vector<AsyncCopy>> cp_groups;  // committed groups not yet performed, oldest first
};

struct Runtime {
  std::vector<Thread> threads;
  ucontext_t sched;
  void* sched_sp = nullptr;
  Thread* cur = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng{1};
  bool seeded = false;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  unsigned long long launches = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Thread* cur() {
  Thread* t = rt().cur;
  if (t == nullptr) fail("a CUDA builtin was used outside a kernel launched through cuda_host::launch");
  return t;
}

inline const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "running";
    case State::AtBarrier: return "at __syncthreads";
    case State::AtWarp: return "at a warp collective";
    case State::Done: return "exited";
  }
  return "?";
}

// Fiber switches (annotated for AddressSanitizer so it follows the stacks).
inline void switch_to(Thread* t) {
  Runtime& r = rt();
  r.cur = t;
#ifdef CUDA_HOST_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t->stack, t->stack_size);
#endif
#ifdef CUDA_HOST_ASM_SWITCH
  cuda_host_switch(&r.sched_sp, t->sp);
#else
  if (swapcontext(&r.sched, &t->ctx) != 0) fail("swapcontext failed");
#endif
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  r.cur = nullptr;
}

inline void yield_to_scheduler(Thread* t, bool final = false) {
  Runtime& r = rt();
#ifdef CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &t->fake_stack, r.sched_stack_bottom, r.sched_stack_size);
#endif
#ifdef CUDA_HOST_ASM_SWITCH
  cuda_host_switch(&t->sp, r.sched_sp);
#else
  if (swapcontext(&t->ctx, &r.sched) != 0) fail("swapcontext failed");
#endif
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
  (void)final;
}

// Out of line: fiber_entry never returns, so locals of its own would leave their ASan redzones
// poisoned on the fiber stack that run_block reuses.
__attribute__((noinline)) inline void check_cp_async_drained(const Thread* t) {
  size_t unwaited = t->cp_open.size();
  for (const auto& g : t->cp_groups) unwaited += g.size();
  if (unwaited != 0)
    fail("thread %d of block (%u,%u,%u) exits with %zu cp.async copies not waited for (cp.async.wait_group)",
         t->linear, rt().block_idx.x, rt().block_idx.y, rt().block_idx.z, unwaited);
}

inline void fiber_entry() {
  Runtime& r = rt();
  Thread* t = r.cur;
#ifdef CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
  (*r.body)();
  check_cp_async_drained(t);
  t->state = State::Done;
  yield_to_scheduler(t, /*final=*/true);
  fail("an exited CUDA thread was resumed");
}

inline unsigned block_threads() {
  const dim3& b = rt().block_dim;
  return b.x * b.y * b.z;
}

// Completes t's warp collective if every lane in its mask has arrived; checks agreement.
inline void try_complete_warp(Thread* t) {
  Runtime& r = rt();
  const int warp_base = t->linear / 32 * 32;
  const unsigned nthreads = block_threads();
  WarpReq* lanes[32] = {};
  const WarpReq* mine = t->req;
  for (int l = 0; l < 32; ++l) {
    if (!(mine->mask >> l & 1u)) continue;
    const unsigned li = static_cast<unsigned>(warp_base + l);
    if (li >= nthreads) fail("%s: mask 0x%08x names lane %d, which does not exist in this block", mine->what, mine->mask, l);
    Thread& o = r.threads[li];
    if (o.state != State::AtWarp) return;  // not there yet (a deadlock is reported at phase end)
    WarpReq* q = o.req;
    if (q->fn != mine->fn || q->mask != mine->mask || q->key != mine->key || q->key2 != mine->key2 ||
        std::strcmp(q->what, mine->what) != 0) {
      fail("divergent warp collective in block (%u,%u,%u) warp %d: lane %d is at %s (mask 0x%08x) but lane %d is at %s "
           "(mask 0x%08x), or their pointer/ldm/layout differ",
           r.block_idx.x, r.block_idx.y, r.block_idx.z, t->linear / 32, mine->lane, mine->what, mine->mask, l, q->what,
           q->mask);
    }
    lanes[l] = q;
  }
  mine->fn(lanes, mine->mask);
  for (int l = 0; l < 32; ++l) {
    if (lanes[l] != nullptr) {
      Thread& o = r.threads[warp_base + l];
      o.state = State::Runnable;
      o.req = nullptr;
    }
  }
}

// ---- shared memory with redzones ------------------------------------------------------------
// CUDA_HOST_SHARED(T, name, n) / CUDA_HOST_SHARED_OBJECT(T, name): per-block heap blocks, so
// AddressSanitizer guards each array exactly (GCC does not instrument the comdat statics that
// plain __shared__ becomes in templates), freed when the block ends (a pointer kept across
// blocks is a use-after-free) and filled with 0xff bytes (NaN in every floating type) so that
// reading shared memory nobody wrote this block shows up in the result.
struct SharedAlloc {
  const void* key;
  void* ptr;
  size_t align;
  size_t bytes;
};

inline std::vector<SharedAlloc>& shared_allocs() {
  static std::vector<SharedAlloc> v;
  return v;
}

inline void* shared_block(const void* key, size_t bytes, size_t align) {
  cur();  // only inside a kernel
  for (const SharedAlloc& a : shared_allocs())
    if (a.key == key) return a.ptr;
  void* p = ::operator new(bytes, std::align_val_t(align));
  std::memset(p, 0xff, bytes);
  shared_allocs().push_back(SharedAlloc{key, p, align, bytes});
  return p;
}

inline bool in_shared(const void* p, size_t n) {
  const auto* c = static_cast<const char*>(p);
  for (const SharedAlloc& a : shared_allocs())
    if (c >= static_cast<const char*>(a.ptr) && c + n <= static_cast<const char*>(a.ptr) + a.bytes) return true;
  return false;
}

inline void free_shared_blocks() {
  for (const SharedAlloc& a : shared_allocs()) ::operator delete(a.ptr, std::align_val_t(a.align));
  shared_allocs().clear();
}

inline void run_block(const std::function<void()>& body) {
  Runtime& r = rt();
  const unsigned n = block_threads();
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.state = State::Runnable;
    t.idx = uint3{i % r.block_dim.x, i / r.block_dim.x % r.block_dim.y, i / (r.block_dim.x * r.block_dim.y)};
    t.linear = static_cast<int>(i);
    t.req = nullptr;
    t.bar_file = nullptr;
    t.fake_stack = nullptr;
    t.cp_open.clear();
    t.cp_groups.clear();
#ifdef CUDA_HOST_ASM_SWITCH
    // initial frame popped by cuda_host_switch: mxcsr/fpu cw, r15..r12, rbx, rbp, return address
    auto* top = reinterpret_cast<uint64_t*>(
        (reinterpret_cast<uintptr_t>(t.stack) + t.stack_size) & ~static_cast<uintptr_t>(15));
    uint32_t csr[2] = {0, 0};
    __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
    __asm__ volatile("fnstcw %0" : "=m"(csr[1]));
    top[-1] = 0;                                          // fiber_entry's (never used) return address
    top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);  // popped by ret
    for (int k = 3; k <= 8; ++k) top[-k] = 0;             // rbp rbx r12 r13 r14 r15
    std::memcpy(&top[-9], csr, 8);
    t.sp = &top[-9];
#else
    if (getcontext(&t.ctx) != 0) fail("getcontext failed");
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = t.stack_size;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
#endif
  }
  r.body = &body;
  std::vector<unsigned> order;
  for (;;) {
    // one phase: run every runnable thread (shuffled) until all are at the barrier or done
    for (;;) {
      order.clear();
      for (unsigned i = 0; i < n; ++i)
        if (r.threads[i].state == State::Runnable) order.push_back(i);
      if (order.empty()) break;
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[r.rng() % i]);
      for (unsigned i : order) {
        Thread* t = &r.threads[i];
        if (t->state != State::Runnable) continue;
        switch_to(t);
        if (t->state == State::AtWarp) try_complete_warp(t);
      }
    }
    int at_bar = -1, at_warp = -1, done = -1;
    for (unsigned i = 0; i < n; ++i) {
      const State s = r.threads[i].state;
      if (s == State::AtBarrier && at_bar < 0) at_bar = static_cast<int>(i);
      if (s == State::AtWarp && at_warp < 0) at_warp = static_cast<int>(i);
      if (s == State::Done && done < 0) done = static_cast<int>(i);
    }
    if (at_warp >= 0) {
      const Thread& t = r.threads[at_warp];
      std::fprintf(stderr, "cuda_host: lanes of warp %d and their states:\n", at_warp / 32);
      for (int l = 0; l < 32 && static_cast<unsigned>(at_warp / 32 * 32 + l) < n; ++l)
        std::fprintf(stderr, "  lane %2d: %s\n", l, state_name(r.threads[at_warp / 32 * 32 + l].state));
      fail("deadlock in block (%u,%u,%u): thread %d waits at %s (mask 0x%08x) for lanes that are at a barrier, "
           "exited, or at another collective",
           r.block_idx.x, r.block_idx.y, r.block_idx.z, at_warp, t.req->what, t.req->mask);
    }
    if (at_bar < 0) break;  // all done
    if (done >= 0) {
      const Thread& t = r.threads[at_bar];
      fail("divergent barrier in block (%u,%u,%u): thread %d waits at __syncthreads (%s:%d) but thread %d has exited",
           r.block_idx.x, r.block_idx.y, r.block_idx.z, at_bar, t.bar_file, t.bar_line, done);
    }
    const Thread& ref = r.threads[at_bar];
    for (unsigned i = 0; i < n; ++i) {
      const Thread& t = r.threads[i];
      if (t.bar_line != ref.bar_line || std::strcmp(t.bar_file, ref.bar_file) != 0) {
        fail("divergent barrier in block (%u,%u,%u): thread %d waits at __syncthreads %s:%d, thread %u at %s:%d",
             r.block_idx.x, r.block_idx.y, r.block_idx.z, at_bar, ref.bar_file, ref.bar_line, i, t.bar_file,
             t.bar_line);
      }
    }
    for (unsigned i = 0; i < n; ++i) r.threads[i].state = State::Runnable;
  }
  r.body = nullptr;
  free_shared_blocks();
}

inline void seed_once() {
  Runtime& r = rt();
  if (r.seeded) return;
  const char* s = std::getenv("CUDA_HOST_SEED");
  r.rng.seed(s != nullptr ? std::strtoull(s, nullptr, 10) : 1ull);
  r.seeded = true;
}

inline void set_seed(unsigned long long seed) {
  rt().rng.seed(seed);
  rt().seeded = true;
}

inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Runtime& r = rt();
  seed_once();
  if (r.cur != nullptr) fail("kernel launched from inside a kernel");
  const unsigned long long nblock = 1ull * block.x * block.y * block.z;
  if (nblock == 0 || nblock > 1024 || block.z > 64) fail("invalid block (%u,%u,%u)", block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z);
  r.block_dim = block;
  r.grid_dim = grid;
  r.launches++;
  const size_t stack_size = 256 * 1024;
  if (r.threads.size() < nblock) {
    const size_t old = r.threads.size();
    r.threads.resize(nblock);
    for (size_t i = old; i < nblock; ++i) {
      void* p = mmap(nullptr, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) fail("cannot allocate a fiber stack");
      r.threads[i].stack = static_cast<char*>(p);
      r.threads[i].stack_size = stack_size;
    }
  }
  std::vector<uint3> blocks;
  blocks.reserve(1ull * grid.x * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[r.rng() % i]);
  for (const uint3& b : blocks) {
    r.block_idx = b;
    run_block(body);
  }
}

// kernel<<<grid, block>>>(args...) becomes launch(grid, block, kernel, args...). The arguments are
// converted to the kernel's parameter types once, like CUDA's by-value parameter copy.
template <class... P, class... A>
void launch(dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  auto params = std::tuple<std::decay_t<P>...>(std::forward<A>(args)...);
  const std::function<void()> body = [&]() { std::apply(kernel, params); };
  run_grid(grid, block, body);
}

// ---- builtins -------------------------------------------------------------------------------

inline const uint3& thread_idx() { return cur()->idx; }
inline const uint3& block_idx() { return rt().block_idx; }
inline const dim3& block_dim() { return rt().block_dim; }
inline const dim3& grid_dim() { return rt().grid_dim; }

inline void syncthreads(const char* file, int line) {
  Thread* t = cur();
  t->state = State::AtBarrier;
  t->bar_file = file;
  t->bar_line = line;
  yield_to_scheduler(t);
}

// cp.async (kernels.cuh's FB_CP_ASYNC_*): copies are queued per thread at issue; commit closes
// the open group; wait_group(n) performs this thread's oldest committed groups until at most n
// are pending. Nothing else performs them -- not __syncthreads, not a later issue -- so a stage
// read before the wait that completes its group reads the 0xff (NaN) fill or an older tile.
inline void cp_async_16(void* dst, const void* src, bool full) {
  Thread* t = cur();
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async: 16-byte copy %p <- %p is not 16-byte aligned", dst, src);
  if (!in_shared(dst, 16)) fail("cp.async: destination %p is not inside a shared-memory block", dst);
  AsyncCopy c;
  c.dst = dst;
  if (full) {
    std::memcpy(c.bytes, src, 16);
  } else {
    std::memset(c.bytes, 0, 16);  // src-size 0: zero-fill, nothing read
  }
  t->cp_open.push_back(c);
}

inline void cp_async_commit() {
  Thread* t = cur();
  t->cp_groups.push_back(std::move(t->cp_open));
  t->cp_open.clear();
}

inline void cp_async_wait(int n) {
  Thread* t = cur();
  if (n < 0) fail("cp.async.wait_group %d: a negative count", n);
  while (t->cp_groups.size() > static_cast<size_t>(n)) {
    for (const AsyncCopy& c : t->cp_groups.front()) std::memcpy(c.dst, c.bytes, 16);
    t->cp_groups.pop_front();
  }
}

inline void warp_collective(WarpReq& q) {
  Thread* t = cur();
  q.lane = t->linear % 32;
  if (!(q.mask >> q.lane & 1u)) fail("%s: lane %d calls it with mask 0x%08x that excludes itself", q.what, q.lane, q.mask);
  t->req = &q;
  t->state = State::AtWarp;
  yield_to_scheduler(t);
}

}  // namespace cuda_host

#define threadIdx (::cuda_host::thread_idx())
#define blockIdx (::cuda_host::block_idx())
#define blockDim (::cuda_host::block_dim())
#define gridDim (::cuda_host::grid_dim())
#define __syncthreads() ::cuda_host::syncthreads(__FILE__, __LINE__)

#define CUDA_HOST_SHARED(T, name, n)                                                                \
  static const char name##_cuda_host_key = 0;                                                       \
  T* const name = static_cast<T*>(::cuda_host::shared_block(&name##_cuda_host_key, sizeof(T) * (n), \
                                                            alignof(T) < 32 ? 32 : alignof(T)))
#define CUDA_HOST_SHARED_OBJECT(T, name)                                                             \
  static const char name##_cuda_host_key = 0;                                                        \
  T& name = *static_cast<T*>(::cuda_host::shared_block(&name##_cuda_host_key, sizeof(T),             \
                                                       alignof(T) < 32 ? 32 : alignof(T)))

// ---- warp intrinsics ------------------------------------------------------------------------
namespace cuda_host {

inline void shfl_complete(WarpReq* const* lanes, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (lanes[l] == nullptr) continue;
    const int s = lanes[l]->src;
    if (s < 0 || s >= 32 || !(mask >> s & 1u))
      fail("%s: lane %d reads lane %d, which is not in mask 0x%08x (undefined in CUDA)", lanes[l]->what, l, s, mask);
    lanes[l]->result = lanes[s]->value;
  }
}

template <class T>
T shfl_generic(const char* what, unsigned mask, T var, int src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  WarpReq q{};
  q.what = what;
  q.mask = mask;
  q.fn = shfl_complete;
  std::memcpy(&q.value, &var, sizeof(T));
  q.src = src;
  warp_collective(q);
  T out;
  std::memcpy(&out, &q.result, sizeof(T));
  return out;
}

inline int lane_id() { return cur()->linear % 32; }

inline void check_width(const char* what, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("%s: width %d is not a power of 2 in [1, 32]", what, width);
}

inline void vote_complete(WarpReq* const* lanes, unsigned) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (lanes[l] != nullptr && lanes[l]->pred) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (lanes[l] != nullptr) lanes[l]->result = ballot;
}

inline unsigned vote(const char* what, unsigned mask, int pred) {
  WarpReq q{};
  q.what = what;
  q.mask = mask;
  q.fn = vote_complete;
  q.pred = pred != 0;
  warp_collective(q);
  return static_cast<unsigned>(q.result);
}

}  // namespace cuda_host

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  ::cuda_host::check_width("__shfl_sync", width);
  const int lane = ::cuda_host::lane_id();
  const int base = lane & ~(width - 1);
  return ::cuda_host::shfl_generic("__shfl_sync", mask, var, base + (src_lane & (width - 1)));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  ::cuda_host::check_width("__shfl_up_sync", width);
  const int lane = ::cuda_host::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane - static_cast<int>(delta) < base ? lane : lane - static_cast<int>(delta);
  return ::cuda_host::shfl_generic("__shfl_up_sync", mask, var, src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  ::cuda_host::check_width("__shfl_down_sync", width);
  const int lane = ::cuda_host::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane + static_cast<int>(delta) >= base + width ? lane : lane + static_cast<int>(delta);
  return ::cuda_host::shfl_generic("__shfl_down_sync", mask, var, src);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  ::cuda_host::check_width("__shfl_xor_sync", width);
  const int lane = ::cuda_host::lane_id();
  const int base = lane & ~(width - 1);
  const int src = (lane ^ lane_mask) >= base + width ? lane : (lane ^ lane_mask);
  return ::cuda_host::shfl_generic("__shfl_xor_sync", mask, var, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::cuda_host::vote("__ballot_sync", mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return ::cuda_host::vote("__any_sync", mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return ::cuda_host::vote("__all_sync", mask, pred) == mask;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::cuda_host::vote("__syncwarp", mask, 0); }

// ---- atomics (one OS thread runs every fiber, and a fiber is never preempted) ----------------
template <class T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicSub(T* p, T v) {
  T old = *p;
  *p = old - v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---- 16-bit floating types --------------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t s = (h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu;
  const uint32_t m = h.bits & 0x3ffu;
  float f;
  if (e == 0) {
    f = std::ldexp(static_cast<float>(m), -24);
    if (s) f = -f;
    return f;
  }
  uint32_t u;
  if (e == 31) {
    u = s | 0x7f800000u | (m << 13);
  } else {
    u = s | ((e + 112u) << 23) | (m << 13);
  }
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t s = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return __half{static_cast<uint16_t>(s | 0x7e00u)};
  if (a >= 65520.0f) return __half{static_cast<uint16_t>(s | 0x7c00u)};  // rounds to inf
  if (a < 6.103515625e-05f) {                                         // subnormal: multiples of 2^-24
    const float q = std::nearbyint(a * 16777216.0f);                  // ties-to-even (default mode)
    return __half{static_cast<uint16_t>(s | static_cast<uint16_t>(q))};
  }
  uint32_t ua;
  std::memcpy(&ua, &a, 4);
  const uint32_t e = (ua >> 23) - 112u;
  uint32_t m = ua & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return __half{static_cast<uint16_t>(s | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ---- nvcuda::wmma (16x16x16) ---------------------------------------------------------------
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class T>
float to_f(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}
template <class T>
T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}
template <class Layout>
constexpr long long layout_code() {
  return std::is_same_v<Layout, row_major> ? 0 : 1;
}
}  // namespace detail

// Each lane holds 8 of the 256 elements: lane l holds the logical row-major elements [8l, 8l+8).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_host emulates the 16x16x16 wmma shape only");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  // Not a collective in CUDA either; every lane fills its own elements.
  for (int i = 0; i < 8; ++i) f.x[i] = detail::from_f<T>(v);
}

namespace detail {

template <class T>
void check_ptr(const char* what, const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::cuda_host::fail("%s: pointer %p is not 256-bit aligned", what, p);
  if ((ldm * sizeof(T)) % 16 != 0)
    ::cuda_host::fail("%s: ldm %u is not a multiple of 16 bytes for %zu-byte elements", what, ldm, sizeof(T));
}

// Logical (i, j) of a 16x16 tile in memory with the given layout (0 row, 1 col major).
inline size_t mem_index(int i, int j, unsigned ldm, long long layout) {
  return layout == 0 ? static_cast<size_t>(i) * ldm + j : static_cast<size_t>(j) * ldm + i;
}

template <class T>
struct LoadArgs {
  const T* p;
  unsigned ldm;
  long long layout;
};

template <class T>
void load_complete(::cuda_host::WarpReq* const* lanes, unsigned) {
  for (int l = 0; l < 32; ++l) {
    auto* q = lanes[l];
    auto* out = static_cast<T*>(q->d);
    const auto* a = static_cast<const LoadArgs<T>*>(q->a);
    for (int t = 0; t < 8; ++t) {
      const int e = l * 8 + t;
      out[t] = a->p[mem_index(e / 16, e % 16, a->ldm, a->layout)];
    }
  }
}

template <class T>
void store_complete(::cuda_host::WarpReq* const* lanes, unsigned) {
  for (int l = 0; l < 32; ++l) {
    auto* q = lanes[l];
    const auto* in = static_cast<const T*>(q->c);
    const auto* a = static_cast<const LoadArgs<T>*>(q->a);
    T* p = const_cast<T*>(a->p);
    for (int t = 0; t < 8; ++t) {
      const int e = l * 8 + t;
      p[mem_index(e / 16, e % 16, a->ldm, a->layout)] = in[t];
    }
  }
}

template <class TA, class TC, class TD>
void mma_complete(::cuda_host::WarpReq* const* lanes, unsigned) {
  float A[256], B[256], C[256];
  for (int l = 0; l < 32; ++l) {
    for (int t = 0; t < 8; ++t) {
      A[l * 8 + t] = to_f(static_cast<const TA*>(lanes[l]->a)[t]);
      B[l * 8 + t] = to_f(static_cast<const TA*>(lanes[l]->b)[t]);
      C[l * 8 + t] = to_f(static_cast<const TC*>(lanes[l]->c)[t]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    for (int t = 0; t < 8; ++t) {
      const int e = l * 8 + t, i = e / 16, j = e % 16;
      float s = C[e];
      for (int k = 0; k < 16; ++k) s += A[i * 16 + k] * B[k * 16 + j];
      static_cast<TD*>(lanes[l]->d)[t] = from_f<TD>(s);
    }
  }
}

template <class T>
void load(const char* what, T* frag_x, const T* p, unsigned ldm, long long layout) {
  check_ptr<T>(what, p, ldm);
  LoadArgs<T> args{p, ldm, layout};
  ::cuda_host::WarpReq q{};
  q.what = what;
  q.mask = 0xffffffffu;
  q.fn = load_complete<T>;
  q.key = p;
  q.key2 = static_cast<long long>(ldm) * 2 + layout;
  q.d = frag_x;
  q.a = &args;
  ::cuda_host::warp_collective(q);
}

}  // namespace detail

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::load<T>("wmma::load_matrix_sync", f.x, p, ldm, detail::layout_code<Layout>());
}

template <class T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::load<T>("wmma::load_matrix_sync", f.x, p, ldm, layout == mem_row_major ? 0 : 1);
}

template <class T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t layout) {
  detail::check_ptr<T>("wmma::store_matrix_sync", p, ldm);
  detail::LoadArgs<T> args{p, ldm, layout == mem_row_major ? 0 : 1};
  ::cuda_host::WarpReq q{};
  q.what = "wmma::store_matrix_sync";
  q.mask = 0xffffffffu;
  q.fn = detail::store_complete<T>;
  q.key = p;
  q.key2 = static_cast<long long>(ldm) * 2 + args.layout;
  q.c = f.x;
  q.a = &args;
  ::cuda_host::warp_collective(q);
}

// d = a . b + c; matrix_a is M x K (here 16 x 16), matrix_b K x N.
template <class TA, class LA, class LB, class TC, class TD>
void mma_sync(fragment<accumulator, 16, 16, 16, TD, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TA, LB>& b, const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  ::cuda_host::WarpReq q{};
  q.what = "wmma::mma_sync";
  q.mask = 0xffffffffu;
  q.fn = detail::mma_complete<TA, TC, TD>;
  q.key = nullptr;
  q.key2 = 0;
  q.d = d.x;
  q.a = a.x;
  q.b = b.x;
  q.c = c.x;
  ::cuda_host::warp_collective(q);
}

}  // namespace nvcuda::wmma
