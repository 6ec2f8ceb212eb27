// The DEFAULT level's elementwise math: csrc/cpu/portable_math.h (VecMath at DEFAULT) against what
// that level ran before, at::vec's DEFAULT Vectorized with its exp/erf calling libm per lane
// (LibmMath), in one binary, interleaved: ns per element of each activation's forward and act'
// over 64K floats (in L2), min of 200 runs, three rounds. Build and run from the repository root:
//
//   I=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT -Icsrc -I$I/include \
//       -I$I/include/torch/csrc/api/include benchmarks/portable_math_bench.cpp -o /tmp/pmb \
//       -L$I/lib -lc10 -Wl,-rpath,$I/lib && /tmp/pmb
#include "cpu/rowwise.h"
#include <chrono>
#include <cstdio>
#include <vector>
using namespace fused_backprop;
namespace L = fused_backprop::cpu::DEFAULT;
using V = at::vec::Vectorized<float>;
// The DEFAULT VecMath before portable_math.h: at::vec's exp and erf, and the float tanh formula on
// at::vec's DEFAULT operations.
struct LibmMath : L::VecMath {
  template <typename W> static W exp(W v) { return v.exp(); }
  template <typename W> static W erf(W v) { return v.erf(); }
  template <typename W> static W tanh(W z) {
    const W ax = z.abs(), z2 = z * z;
    W p = at::vec::fmadd(W(-0.005691935773938894f), z2, W(0.02062624879181385f));
    p = at::vec::fmadd(p, z2, W(-0.05373530462384224f));
    p = at::vec::fmadd(p, z2, W(0.13331380486488342f));
    p = at::vec::fmadd(p, z2, W(-0.3333328068256378f));
    const W small = at::vec::fmadd(z * z2, p, z);
    const W big = (W(1) - W(2) / ((ax + ax).exp() + W(1))) | (z & W(-0.f));
    return W::blendv(big, small, ax < W(0.625f));
  }
};
template <Activation A, typename M>
__attribute__((noinline)) void run(float* out, const float* in, int n) {
  for (int j = 0; j + V::size() <= n; j += V::size())
    Act<A>::template forward<V, M>(V::loadu(in + j), V(0.01f)).store(out + j);
}
template <Activation A, typename M>
__attribute__((noinline)) void run_grad(float* out, const float* in, int n) {
  for (int j = 0; j + V::size() <= n; j += V::size())
    Act<A>::template grad_from_preact<V, M>(V::loadu(in + j), V(0.01f)).store(out + j);
}
int main() {
  const int n = 1 << 16; std::vector<float> in(n), out(n);
  unsigned s = 1; for (int i = 0; i < n; ++i) { float g = 0; for (int k = 0; k < 12; ++k) { s = s * 1664525u + 1013904223u; g += (s >> 8) * (1.f / 16777216); } in[i] = (g - 6) * 1.5f; }
  auto bench = [&](void (*f)(float*, const float*, int)) { double best = 1e9; for (int r = 0; r < 200; ++r) { auto t0 = std::chrono::steady_clock::now(); f(out.data(), in.data(), n); best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()); } return best / n * 1e9; };
#define B(A, name) for (int rep = 0; rep < 3; ++rep) printf("%-10s forward libm %.3f portable %.3f | act' libm %.3f portable %.3f ns/element\n", name, bench(run<Activation::A, LibmMath>), bench(run<Activation::A, L::VecMath>), bench(run_grad<Activation::A, LibmMath>), bench(run_grad<Activation::A, L::VecMath>));
  B(Sigmoid, "sigmoid") B(Tanh, "tanh") B(GELU, "gelu") B(GELUTanh, "gelu_tanh") B(SiLU, "silu")
}
