// Runs the CUDA kernels of csrc/cuda/kernels.cuh on the CPU (through cuda_host.h) and compares
// them with a plain double-precision host reference. Exits non-zero on any mismatch; the
// harness itself aborts on divergent barriers/collectives, and the sanitizers on any
// out-of-bounds access.
//
//   harness_main --dtype f32|f64|f16|bf16 --act NAME --mode fwd|fwd_preact|bwd|bwd_mask|recompute
//                [--slope A] [--bias 0|1] [--mask 111] [--pad P] [--misalign 0|1] [--seed S]
//                M,K,N [M,K,N ...]
//   harness_main --list               (the activations, one per line)
//   harness_main --dtype D --plan M,K,N ...   (the split-K plans of the layer's GEMMs)
//   harness_main --selftest NAME      (harness self-tests; see run_selftest)
//
// --act: any name of csrc/activations.def. --slope A: the activation's parameter (leaky relu's
// negative slope, default 0.01; the others ignore it).
// Modes: fwd (y), fwd_preact (y and the pre-activation z; y must be bitwise the y of fwd), bwd
// (from what the forward saves, as kSaved says: y, or z for gelu, gelu_tanh, silu), bwd_mask (relu
// and leaky relu: from the 0/1 values of y > 0 that the Python layer unpacks a sign mask to),
// recompute (no saved tensor).
// --pad P adds P elements to every leading dimension (strided rows); --misalign 1 offsets every
// matrix by one element so the 16-byte vector path is off and the scalar path runs.
#include "cuda_host.h"
// the kernels under test
#include "cuda/kernels.cuh"

#include <array>
#include <cinttypes>
#include <string>

using fused_backprop::Activation;
namespace fbc = fused_backprop::cuda;

namespace {

// ---- the host reference's activations: its own double-precision formulas (activation.h is what
// is under test, so it is not used here) -------------------------------------------------------
// f(z, a) = act(z); df(z, a) = act'(z); df_from_y(y, a) = act'(z) written with y = act(z), for
// the activations whose backward takes the layer output (nullptr for those that keep z).
struct RefAct {
  const char* name;
  double (*f)(double z, double a);
  double (*df)(double z, double a);
  double (*df_from_y)(double y, double a);
};

constexpr double kSqrt2OverPi = 0.797884560802865355879892119869;  // sqrt(2 / pi)
constexpr double kInvSqrt2Pi = 0.398942280401432677939946059934;   // 1 / sqrt(2 pi)
constexpr double kInvSqrt2 = 0.707106781186547524400844362105;     // 1 / sqrt(2)
constexpr double kGeluTanhC = 0.044715;

double logistic(double z) { return 1.0 / (1.0 + std::exp(-z)); }
double sech2(double u) { return 1.0 / (std::cosh(u) * std::cosh(u)); }
double gelu_tanh_u(double z) { return kSqrt2OverPi * (z + kGeluTanhC * z * z * z); }

const RefAct kRefActs[] = {
    {"relu", [](double z, double) { return z > 0 ? z : 0.0; }, [](double z, double) { return z > 0 ? 1.0 : 0.0; },
     [](double y, double) { return y > 0 ? 1.0 : 0.0; }},
    {"sigmoid", [](double z, double) { return logistic(z); },
     [](double z, double) { return logistic(z) * logistic(-z); }, [](double y, double) { return y * (1 - y); }},
    {"tanh", [](double z, double) { return std::tanh(z); }, [](double z, double) { return sech2(z); },
     [](double y, double) { return 1 - y * y; }},
    {"leaky_relu", [](double z, double a) { return z > 0 ? z : a * z; },
     [](double z, double a) { return z > 0 ? 1.0 : a; }, [](double y, double a) { return y > 0 ? 1.0 : a; }},
    // z Phi(z), Phi(z) = erfc(-z / sqrt 2) / 2
    {"gelu", [](double z, double) { return 0.5 * z * std::erfc(-z * kInvSqrt2); },
     [](double z, double) { return 0.5 * std::erfc(-z * kInvSqrt2) + z * kInvSqrt2Pi * std::exp(-0.5 * z * z); },
     nullptr},
    {"gelu_tanh", [](double z, double) { return 0.5 * z * (1 + std::tanh(gelu_tanh_u(z))); },
     [](double z, double) {
       const double u = gelu_tanh_u(z);
       return 0.5 * (1 + std::tanh(u)) + 0.5 * z * sech2(u) * kSqrt2OverPi * (1 + 3 * kGeluTanhC * z * z);
     },
     nullptr},
    {"silu", [](double z, double) { return z * logistic(z); },
     [](double z, double) { return logistic(z) * (1 + z * logistic(-z)); }, nullptr},
};

// The reference entry of an activations.def row; a row without one stops the harness.
const RefAct& ref_act(Activation act) {
  const char* name = fused_backprop::info(act).name;
  for (const RefAct& r : kRefActs) {
    if (std::strcmp(r.name, name) == 0) return r;
  }
  std::fprintf(stderr, "the host reference has no formulas for activation '%s' (tests/cuda_harness/harness_main.cpp)\n",
               name);
  std::exit(2);
}

struct Options {
  std::string dtype = "f32", act = "relu", mode = "fwd";
  Activation activation = Activation::ReLU;
  double slope = 0.01;
  bool bias = true;
  bool mask[3] = {true, true, true};
  int64_t pad = 0;
  bool misalign = false;
  uint64_t seed = 0;
  bool plan = false;
  std::vector<std::array<int64_t, 3>> shapes;
};

// The split-K plans of a layer's GEMMs, one line each: "gemm rows cols red tiles splits split_len BK"
// (fwd: also the recompute dZ GEMM, same shape).
template <typename T>
void print_plans(int64_t M, int64_t K, int64_t N) {
  const struct {
    const char* what;
    int64_t rows, cols, red;
  } gemms[] = {{"fwd", M, N, K}, {"dx", M, K, N}, {"dw", N, K, M}};
  for (const auto& g : gemms) {
    fbc::detail::with_gemm_config<T>(g.rows, g.cols, [&]<class Cfg>() {
      const fbc::detail::SplitPlan p = fbc::detail::split_plan<Cfg>(g.rows, g.cols, g.red);
      const int64_t tiles = fbc::detail::ceil_div(g.rows, Cfg::BM) * fbc::detail::ceil_div(g.cols, Cfg::BN);
      std::printf("%s %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 " %d\n", g.what, g.rows,
                  g.cols, g.red, tiles, p.splits, p.split_len, Cfg::BK);
    });
  }
}

template <typename T>
double to_d(T v) {
  return static_cast<double>(fbc::Num<T>::to_acc(v));
}
template <typename T>
T from_d(double v) {
  return fbc::Num<T>::from_acc(static_cast<fbc::acc_t<T>>(v));
}
// Round a double through T (what storing it as T does).
template <typename T>
double round_t(double v) {
  return to_d(from_d<T>(v));
}

template <typename T>
T nan_t() {
  return from_d<T>(std::nan(""));
}

// A rows x cols matrix with leading dimension cols + pad, 64-byte aligned (or one element off on
// purpose), in a heap block sized exactly to its last element so that ASan reports any access
// past it. Filled with NaN: an element the kernel should have written but did not stays NaN.
template <typename T>
struct Mat {
  void* block = nullptr;
  T* p = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  Mat(int64_t r, int64_t c, int64_t pad, bool misalign) : rows(r), cols(c), ld(c + pad) {
    const int64_t off = misalign ? 1 : 0;
    const int64_t n = r == 0 ? 0 : (r - 1) * ld + c;
    block = ::operator new(static_cast<size_t>(n + off) * sizeof(T) + (n + off == 0 ? 1 : 0), std::align_val_t(64));
    p = static_cast<T*>(block) + off;
    for (int64_t i = 0; i < n; ++i) p[i] = nan_t<T>();
  }
  Mat(const Mat&) = delete;
  Mat& operator=(const Mat&) = delete;
  ~Mat() { ::operator delete(block, std::align_val_t(64)); }
  T& at(int64_t r, int64_t c) { return p[r * ld + c]; }
  double get(int64_t r, int64_t c) const { return to_d(p[r * ld + c]); }
};

template <typename T>
void fill_random(Mat<T>& m, std::mt19937_64& g, double scale) {
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) m.at(r, c) = from_d<T>(nd(g) * scale);
}

struct Tol {
  double rtol, atol;
};
template <typename T>
Tol tol() {
  if constexpr (std::is_same_v<T, double>) return {1e-9, 1e-9};
  if constexpr (std::is_same_v<T, float>) return {1e-4, 1e-4};
  if constexpr (std::is_same_v<T, __half>) return {1e-2, 1e-2};
  return {3e-2, 3e-2};
}

template <typename T>
bool compare(const char* what, const Mat<T>& got, const std::vector<double>& ref, int64_t cols) {
  const Tol t = tol<T>();
  double max_err = 0;
  int64_t bad = 0, first_r = -1, first_c = -1;
  for (int64_t r = 0; r < got.rows; ++r) {
    for (int64_t c = 0; c < got.cols; ++c) {
      const double g = got.get(r, c), e = ref[r * cols + c];
      const double err = std::fabs(g - e);
      const bool ok = err <= t.atol + t.rtol * std::fabs(e);  // false for NaN
      if (!ok) {
        if (bad == 0) first_r = r, first_c = c;
        ++bad;
      }
      if (!(err <= max_err)) max_err = err;
    }
  }
  std::printf("    %-3s %5" PRId64 "x%-5" PRId64 " max|err| %.3e  %s\n", what, got.rows, got.cols, max_err,
              bad ? "MISMATCH" : "ok");
  if (bad) {
    std::printf("      %" PRId64 " bad elements; first at (%" PRId64 ", %" PRId64 "): got %.9g, want %.9g\n", bad,
                first_r, first_c, got.get(first_r, first_c), ref[first_r * cols + first_c]);
  }
  return bad == 0;
}

void no_check() {}

// Whether two matrices hold the same bits.
template <typename T>
bool same_bits(const Mat<T>& a, const Mat<T>& b) {
  for (int64_t r = 0; r < a.rows; ++r) {
    if (std::memcmp(&a.p[r * a.ld], &b.p[r * b.ld], static_cast<size_t>(a.cols) * sizeof(T)) != 0) return false;
  }
  return true;
}

// Launcher scratch as the glue gets it (256-byte aligned), filled with 0xff bytes (NaN) so a read
// of a slot nobody wrote shows up in the result.
struct Workspace {
  void* p = nullptr;
  explicit Workspace(size_t bytes) {
    if (bytes == 0) return;
    p = ::operator new(bytes, std::align_val_t(256));
    std::memset(p, 0xff, bytes);
  }
  ~Workspace() {
    if (p) ::operator delete(p, std::align_val_t(256));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

template <typename T, Activation A>
bool run_case(const Options& o, const RefAct& ref, int64_t M, int64_t K, int64_t N) {
  // the parameter as the kernels get it (rounded to the accumulation type), for both sides
  const fbc::acc_t<T> a_acc = static_cast<fbc::acc_t<T>>(o.slope);
  const double a = static_cast<double>(a_acc);
  std::mt19937_64 g(o.seed * 1000003ull + static_cast<uint64_t>(M * 131 + K * 17 + N));
  Mat<T> x(M, K, o.pad, o.misalign), w(N, K, o.pad, o.misalign), b(1, N, 0, o.misalign);
  fill_random(x, g, 1.0);
  fill_random(w, g, 1.0 / std::sqrt(static_cast<double>(K)));
  fill_random(b, g, 1.0);
  const T* bias = o.bias ? b.p : nullptr;

  // reference pre-activation and output in double
  std::vector<double> z(static_cast<size_t>(M * N)), y(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = o.bias ? b.get(0, n) : 0.0;
      for (int64_t k = 0; k < K; ++k) s += x.get(m, k) * w.get(n, k);
      z[m * N + n] = s;
      y[m * N + n] = ref.f(s, a);
    }

  bool ok = true;
  std::printf("  M=%" PRId64 " K=%" PRId64 " N=%" PRId64 "\n", M, K, N);
  if (o.mode == "fwd" || o.mode == "fwd_preact") {
    const bool keep = o.mode == "fwd_preact";
    Mat<T> out(M, N, o.pad, o.misalign), zt(M, N, o.pad, o.misalign);
    Workspace ws(fbc::fwd_workspace_bytes<T>(M, N, K));
    fbc::FwdProblem<T> p{x.p, x.ld, w.p, w.ld, bias, out.p, out.ld, keep ? zt.p : nullptr, zt.ld, M, N, K,
                         ws.p, a_acc};
    fbc::launch_forward<T, A>(p, nullptr, no_check);
    ok &= compare("y", out, y, N);
    if (keep) {
      ok &= compare("z", zt, z, N);
      // y does not depend on whether z is stored
      Mat<T> alone(M, N, o.pad, o.misalign);
      p.out = alone.p;
      p.preact = nullptr;
      fbc::launch_forward<T, A>(p, nullptr, no_check);
      if (!same_bits(out, alone)) ok = false, std::printf("    y differs from the y of a forward without z\n");
    }
    return ok;
  }

  // what backward is given: nothing (recompute), y or z as kSaved says, or y's 0/1 sign mask
  const bool recompute = o.mode == "recompute", from_mask = o.mode == "bwd_mask";
  const bool saves_y = fused_backprop::kSaved<A> == fused_backprop::Saved::Output;
  Mat<T> dy(M, N, o.pad, o.misalign), st(M, N, o.pad, o.misalign);
  fill_random(dy, g, 1.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const double v = y[m * N + n];
      st.at(m, n) = from_d<T>(from_mask ? (v > 0 ? 1.0 : 0.0) : saves_y ? v : z[m * N + n]);
    }
  // reference dZ, rounded through T like the kernels (and an eager backward) store it
  std::vector<double> dz(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const double d = dy.get(m, n);
      // (a 0/1 mask is a y as far as act' is concerned: 1 > 0 where y > 0, 0 elsewhere)
      const double gz = recompute ? ref.df(z[m * N + n], a)
                        : saves_y ? ref.df_from_y(st.get(m, n), a)
                                  : ref.df(st.get(m, n), a);
      dz[m * N + n] = round_t<T>(d * gz);
    }
  std::vector<double> dx(static_cast<size_t>(M * K), 0.0), dw(static_cast<size_t>(N * K), 0.0), db(N, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const double d = dz[m * N + n];
      db[n] += d;
      for (int64_t k = 0; k < K; ++k) {
        dx[m * K + k] += d * w.get(n, k);
        dw[n * K + k] += d * x.get(m, k);
      }
    }

  const bool want_dx = o.mask[0], want_dw = o.mask[1], want_db = o.mask[2] && o.bias;
  Mat<T> gx(M, K, o.pad, o.misalign), gw(N, K, o.pad, o.misalign), gb(1, N, 0, o.misalign);
  Workspace ws(fbc::bwd_workspace_bytes<T>(M, N, K, recompute, want_dx, want_dw, want_db));
  const fbc::BwdProblem<T> p{dy.p,
                             dy.ld,
                             x.p,
                             x.ld,
                             w.p,
                             w.ld,
                             bias,
                             recompute ? nullptr : st.p,
                             st.ld,
                             want_dx ? gx.p : nullptr,
                             gx.ld,
                             want_dw ? gw.p : nullptr,
                             gw.ld,
                             want_db ? gb.p : nullptr,
                             M,
                             N,
                             K,
                             ws.p,
                             a_acc};
  fbc::launch_backward<T, A>(p, nullptr, no_check);

  if (M == 0 || N == 0) {
    // the launcher returns before any launch; the glue fills these cases
    std::printf("    (empty problem: nothing launched, %llu launches so far)\n", cuda_host::rt().launches);
    return true;
  }
  if (want_dx) ok &= compare("dx", gx, dx, K);
  if (want_dw) ok &= compare("dw", gw, dw, K);
  if (want_db) ok &= compare("db", gb, db, N);
  // unrequested outputs must stay untouched (still NaN)
  if (!want_dx && M * K > 0 && !std::isnan(gx.get(0, 0))) ok = false, std::printf("    dx written but not requested\n");
  if (!want_dw && N * K > 0 && !std::isnan(gw.get(0, 0))) ok = false, std::printf("    dw written but not requested\n");
  if (!want_db && !std::isnan(gb.get(0, 0))) ok = false, std::printf("    db written but not requested\n");
  return ok;
}

template <typename T>
bool run_all(const Options& o) {
  const RefAct& ref = ref_act(o.activation);
  return fused_backprop::dispatch_activation(o.activation, [&]<Activation A>() {
    bool ok = true;
    for (const auto& s : o.shapes) ok &= run_case<T, A>(o, ref, s[0], s[1], s[2]);
    return ok;
  });
}

// Checks the options against activations.def and the reference; prints why not and returns false.
bool resolve(Options& o) {
  bool found = false;
  for (int i = 0; i < fused_backprop::kNumActivations; ++i) {
    const auto act = static_cast<Activation>(i);
    const RefAct& ref = ref_act(act);  // every row has reference formulas, and the same saved kind
    if ((fused_backprop::info(act).saved == fused_backprop::Saved::Output) != (ref.df_from_y != nullptr)) {
      std::fprintf(stderr, "activations.def and the host reference disagree on what '%s' saves\n", ref.name);
      return false;
    }
    if (o.act == ref.name) o.activation = act, found = true;
  }
  if (!found) return std::fprintf(stderr, "bad --act %s (--list shows the names)\n", o.act.c_str()), false;
  const auto& info = fused_backprop::info(o.activation);
  if (o.mode != "fwd" && o.mode != "fwd_preact" && o.mode != "bwd" && o.mode != "bwd_mask" &&
      o.mode != "recompute") {
    return std::fprintf(stderr, "bad --mode %s\n", o.mode.c_str()), false;
  }
  if (o.mode == "bwd_mask" && !info.sign_decides) {
    return std::fprintf(stderr, "--mode bwd_mask needs an activation whose sign decides act' (relu, leaky_relu)\n"),
           false;
  }
  if ((o.mode == "bwd" || o.mode == "bwd_mask") && o.activation == Activation::LeakyReLU && o.slope < 0) {
    // as check_backward_args: with a < 0, y > 0 for z < 0 too, so y does not give the branch
    return std::fprintf(stderr, "leaky_relu with --slope < 0 has no backward from the output: use recompute\n"),
           false;
  }
  return true;
}

// Calls f.template operator()<T>() for the element type `dtype` names; false if this build has
// none. HARNESS_ONLY_F32 / HARNESS_ONLY_F16 build one type (faster to compile; the mutation tests
// use them: f32 for the FMA and shared kernels, f16 for the WMMA kernel).
template <class F>
bool with_dtype(const std::string& dtype, F&& f) {
#if !defined(HARNESS_ONLY_F16)
  if (dtype == "f32") return f.template operator()<float>(), true;
#endif
#if !defined(HARNESS_ONLY_F32) && !defined(HARNESS_ONLY_F16)
  if (dtype == "f64") return f.template operator()<double>(), true;
  if (dtype == "bf16") return f.template operator()<__nv_bfloat16>(), true;
#endif
#if !defined(HARNESS_ONLY_F32)
  if (dtype == "f16") return f.template operator()<__half>(), true;
#endif
  return false;
}

// ---- harness self-tests ----------------------------------------------------------------------
__global__ void order_kernel(int* log, int* pos) {
  log[atomicAdd(pos, 1)] = static_cast<int>(threadIdx.x);
  __syncthreads();
  log[atomicAdd(pos, 1)] = static_cast<int>(threadIdx.x);
}

__global__ void vote_kernel(unsigned* out, int* sums) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  out[threadIdx.x] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  int v = lane;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  sums[threadIdx.x] = v + __shfl_sync(0xffffffffu, lane, 5) * 1000 + __shfl_up_sync(0xffffffffu, lane, 1) * 100000;
  __syncwarp();
  const bool any = __any_sync(0xffffffffu, lane == 7), all = __all_sync(0xffffffffu, lane < 32);
  if (lane == 0 && any && all && !__all_sync(1u, lane == 5)) atomicAdd(&sums[64], 1);
}

__global__ void divergent_barrier_kernel(int* p) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  p[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* p) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  p[threadIdx.x] = 1;
}

__global__ void divergent_shfl_kernel(int* p) {
  if (threadIdx.x < 16) p[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

__global__ void shared_oob_kernel(float* p) {
  CUDA_HOST_SHARED(float, s, 64);
  s[threadIdx.x] = 1.0f;  // launched with 65 threads
  __syncthreads();
  p[threadIdx.x] = s[0];
}

__global__ void local_oob_kernel(int* p, int n) {
  int local[8];
  int* q = local;  // through a pointer: ASan (not UBSan's array bounds) must see the fiber stack
  for (int i = 0; i < n; ++i) q[i] = static_cast<int>(threadIdx.x) + i;  // n = 9: one past the end
  p[threadIdx.x] = q[n / 2];
}

__global__ void missing_sync_kernel(float* out) {
  CUDA_HOST_SHARED(float, s, 64);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  // no __syncthreads: reading a neighbour's slot races
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// cp.async (FB_CP_ASYNC_*): thread t copies 16-byte chunk t into slot t (group 1), chunk 64 + t
// into slot 64 + t and zeros into slot 128 + t (group 2); seen[4t + i] records whether step i saw
// what CUDA guarantees: nothing landed before a wait, wait_group(1) completes group 1 only, a
// neighbour's copies are visible after its wait and a barrier, wait_group(0) lands the rest.
__global__ void cp_async_kernel(const uint4* src, int* seen) {
  CUDA_HOST_SHARED(uint4, s, 192);
  const int t = static_cast<int>(threadIdx.x), u = (t + 1) % 64;
  const auto same = [](const uint4& a, const uint4& b) { return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w; };
  const uint4 fill{~0u, ~0u, ~0u, ~0u}, zero{0u, 0u, 0u, 0u};
  FB_CP_ASYNC_16(&s[t], &src[t], true);
  FB_CP_ASYNC_COMMIT();
  FB_CP_ASYNC_16(&s[64 + t], &src[64 + t], true);
  FB_CP_ASYNC_16(&s[128 + t], &src[t], false);
  FB_CP_ASYNC_COMMIT();
  seen[4 * t] = same(s[t], fill) && same(s[64 + t], fill) && same(s[128 + t], fill);
  FB_CP_ASYNC_WAIT(1);
  seen[4 * t + 1] = same(s[t], src[t]) && same(s[64 + t], fill) && same(s[128 + t], fill);
  __syncthreads();
  seen[4 * t + 2] = same(s[u], src[u]);
  FB_CP_ASYNC_WAIT(0);
  seen[4 * t + 3] = same(s[64 + t], src[64 + t]) && same(s[128 + t], zero);
}

__global__ void cp_async_unwaited_kernel(const uint4* src) {
  CUDA_HOST_SHARED(uint4, s, 64);
  FB_CP_ASYNC_16(&s[threadIdx.x], &src[threadIdx.x], true);
  FB_CP_ASYNC_COMMIT();  // and no wait_group before the thread exits
}

// Which output element each thread's epilogue calls write, in call order.
using CallLog = std::vector<std::vector<std::pair<int64_t, int64_t>>>;
template <typename Acc>
struct LaneLogEpilogue {
  CallLog* log;
  void operator()(int64_t r, int64_t c, Acc) const { (*log)[threadIdx.x].emplace_back(r, c); }
  const LaneLogEpilogue& for_split(unsigned) const { return *this; }
};

// One full block tile of GEMM configuration Cfg: the i-th epilogue call of the 32 lanes of every
// warp must write 32 consecutive columns of one row (coalesced global stores).
template <typename T, class Cfg>
bool epilogue_lanes_consecutive(const char* what) {
  const int64_t M = Cfg::BM, N = Cfg::BN, K = 2 * Cfg::BK;
  std::vector<T> a(M * K, fbc::Num<T>::from_acc(0)), b(N * K, fbc::Num<T>::from_acc(0));
  const fbc::PlainOperand<T, true> x{a.data(), K, M, K, true}, w{b.data(), K, N, K, true};
  CallLog log(Cfg::NT);
  fbc::detail::run_gemm<T, Cfg>(x, w, LaneLogEpilogue<fbc::acc_t<T>>{&log}, M, N, K, nullptr, no_check);
  size_t calls = 0;
  for (int t = 0; t < Cfg::NT; ++t) calls += log[t].size();
  bool ok = calls == static_cast<size_t>(M * N);
  for (int w0 = 0; ok && w0 < Cfg::NT; w0 += 32) {
    for (size_t i = 0; ok && i < log[w0].size(); ++i) {
      for (int l = 0; ok && l < 32; ++l) {
        ok = log[w0 + l].size() == log[w0].size() && log[w0 + l][i].first == log[w0][i].first &&
             log[w0 + l][i].second == log[w0][i].second + l;
        if (!ok)
          std::printf("%s: call %zu of warp %d: lane 0 writes (%" PRId64 ", %" PRId64 "), lane %d (%" PRId64
                      ", %" PRId64 ")\n", what, i, w0 / 32, log[w0][i].first, log[w0][i].second, l,
                      log[w0 + l].empty() ? -1 : log[w0 + l][i % log[w0 + l].size()].first,
                      log[w0 + l].empty() ? -1 : log[w0 + l][i % log[w0 + l].size()].second);
      }
    }
  }
  std::printf("epilogue lanes %s: %s\n", what, ok ? "consecutive" : "NOT consecutive");
  return ok;
}

int run_selftest(const std::string& name) {
  if (name == "schedule") {
    // deterministic for a seed, shuffled between barriers, different across seeds
    auto run = [](unsigned long long seed) {
      cuda_host::set_seed(seed);
      std::vector<int> log(128);
      int pos = 0;
      cuda_host::launch(dim3(1), dim3(64), order_kernel, log.data(), &pos);
      return log;
    };
    const auto a = run(1), b = run(1), c = run(2);
    std::vector<int> first(a.begin(), a.begin() + 64), second(a.begin() + 64, a.end());
    std::vector<int> sorted = first;
    std::sort(sorted.begin(), sorted.end());
    bool is_perm = true;
    for (int i = 0; i < 64; ++i) is_perm &= sorted[i] == i;
    std::sort(second.begin(), second.end());
    for (int i = 0; i < 64; ++i) is_perm &= second[i] == i;
    bool shuffled = false;
    for (int i = 0; i < 64; ++i) shuffled |= first[i] != i;
    const bool reorders = !std::equal(a.begin(), a.begin() + 64, a.begin() + 64);
    std::printf("deterministic=%d differs_across_seeds=%d shuffled=%d reshuffled_after_barrier=%d barrier_ok=%d\n",
                a == b, a != c, shuffled, reorders, is_perm);
    return a == b && a != c && shuffled && reorders && is_perm ? 0 : 1;
  }
  if (name == "votes") {
    std::vector<unsigned> ballots(64);
    std::vector<int> sums(65, 0);
    cuda_host::launch(dim3(2), dim3(64), vote_kernel, ballots.data(), sums.data());
    unsigned want = 0;
    for (int l = 0; l < 32; l += 3) want |= 1u << l;
    bool ok = sums[64] == 4;  // 2 warps x 2 blocks
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32;
      ok &= ballots[t] == want;
      ok &= sums[t] == 496 + 5 * 1000 + (lane == 0 ? 0 : lane - 1) * 100000;
    }
    std::printf("votes/shuffles/atomics %s\n", ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
  }
  if (name == "epilogue-lanes") {
    bool ok = epilogue_lanes_consecutive<float, fbc::FmaF32Wide>("f32 wide");
    ok &= epilogue_lanes_consecutive<float, fbc::FmaF32Narrow>("f32 narrow");
#ifndef HARNESS_ONLY_F32
    ok &= epilogue_lanes_consecutive<double, fbc::FmaF64>("f64");
    ok &= epilogue_lanes_consecutive<__half, fbc::WmmaConfig>("f16 wmma");
#endif
    return ok ? 0 : 1;
  }
  if (name == "cp-async") {
    std::vector<uint4> src(128);
    for (unsigned i = 0; i < 128; ++i) src[i] = uint4{i, 7 * i + 1, 0x12345678u ^ i, 3 * i};
    std::vector<int> seen(256, 0);
    cuda_host::launch(dim3(1), dim3(64), cp_async_kernel, static_cast<const uint4*>(src.data()), seen.data());
    int wrong[4] = {};
    for (int t = 0; t < 64; ++t)
      for (int i = 0; i < 4; ++i) wrong[i] += seen[4 * t + i] == 0;
    std::printf("cp.async: threads that saw a wrong slot: before any wait %d, after wait_group(1) %d, "
                "neighbour after the barrier %d, after wait_group(0) %d\n", wrong[0], wrong[1], wrong[2], wrong[3]);
    return wrong[0] + wrong[1] + wrong[2] + wrong[3] == 0 ? 0 : 1;
  }
  if (name == "missing-sync") {
    // expected to be caught as a wrong result (reads of not-yet-written, NaN-filled slots)
    std::vector<float> out(64);
    cuda_host::launch(dim3(1), dim3(64), missing_sync_kernel, out.data());
    int wrong = 0;
    for (int t = 0; t < 64; ++t) wrong += out[t] != static_cast<float>((t + 1) % 64);
    std::printf("missing __syncthreads: %d of 64 reads wrong\n", wrong);
    return wrong > 0 ? 0 : 1;
  }
  std::vector<int> buf(1024, 0);
  std::vector<float> fbuf(1024, 0);
  if (name == "divergent-barrier") cuda_host::launch(dim3(1), dim3(64), divergent_barrier_kernel, buf.data());
  else if (name == "exit-before-barrier") cuda_host::launch(dim3(1), dim3(64), exit_before_barrier_kernel, buf.data());
  else if (name == "divergent-shfl") cuda_host::launch(dim3(1), dim3(32), divergent_shfl_kernel, buf.data());
  else if (name == "local-oob") cuda_host::launch(dim3(1), dim3(32), local_oob_kernel, buf.data(), 9);
  else if (name == "shared-oob") cuda_host::launch(dim3(1), dim3(65), shared_oob_kernel, fbuf.data());
  else if (name == "cp-async-unwaited") {
    std::vector<uint4> src(64);
    cuda_host::launch(dim3(1), dim3(64), cp_async_unwaited_kernel, static_cast<const uint4*>(src.data()));
  }
  else {
    std::fprintf(stderr, "unknown selftest %s\n", name.c_str());
    return 2;
  }
  std::printf("selftest %s was expected to abort but returned\n", name.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--selftest") return run_selftest(next());
    if (a == "--list") {
      for (const auto& act : fused_backprop::kActivations) std::printf("%s\n", act.name);
      return 0;
    }
    if (a == "--dtype") o.dtype = next();
    else if (a == "--slope") o.slope = std::stod(next());
    else if (a == "--act") o.act = next();
    else if (a == "--mode") o.mode = next();
    else if (a == "--bias") o.bias = next() != "0";
    else if (a == "--pad") o.pad = std::stoll(next());
    else if (a == "--misalign") o.misalign = next() != "0";
    else if (a == "--plan") o.plan = true;
    else if (a == "--seed") {
      o.seed = std::stoull(next());
      cuda_host::set_seed(o.seed + 1);
    } else if (a == "--mask") {
      const std::string m = next();
      if (m.size() != 3) return std::fprintf(stderr, "--mask takes three 0/1 digits\n"), 2;
      for (int j = 0; j < 3; ++j) o.mask[j] = m[j] == '1';
    } else {
      std::array<int64_t, 3> s{};
      if (std::sscanf(a.c_str(), "%" SCNd64 ",%" SCNd64 ",%" SCNd64, &s[0], &s[1], &s[2]) != 3)
        return std::fprintf(stderr, "bad argument %s (want M,K,N)\n", a.c_str()), 2;
      o.shapes.push_back(s);
    }
  }
  if (o.plan) {
    for (const auto& s : o.shapes)
      if (!with_dtype(o.dtype, [&]<typename T>() { print_plans<T>(s[0], s[1], s[2]); }))
        return std::fprintf(stderr, "bad --dtype %s\n", o.dtype.c_str()), 2;
    return 0;
  }
  if (!resolve(o)) return 2;
  std::printf("%s %s %s slope=%g bias=%d mask=%d%d%d pad=%" PRId64 " misalign=%d\n", o.dtype.c_str(),
              o.act.c_str(), o.mode.c_str(), o.slope, o.bias, o.mask[0], o.mask[1], o.mask[2], o.pad, o.misalign);
  bool ok = false;
  if (!with_dtype(o.dtype, [&]<typename T>() { ok = run_all<T>(o); }))
    return std::fprintf(stderr, "bad --dtype %s\n", o.dtype.c_str()), 2;
  std::printf("%s (%llu kernel launches)\n", ok ? "PASS" : "FAIL", cuda_host::rt().launches);
  return ok ? 0 : 1;
}
