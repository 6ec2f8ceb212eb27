// Which SIMD level's CPU kernels run: chosen once, on first use, as ATen chooses its own.
#include <ATen/Version.h>

#include <unistd.h>

#include <cctype>
#include <fstream>
#include <string>

#include "cpu/kernels.h"

namespace fused_backprop::cpu {
namespace {

// The level torch runs (at::get_cpu_capability(): what the CPU supports, or lower where
// ATEN_CPU_CAPABILITY asks), or the best level built below it (a build may leave levels out).
const Kernels& choose() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string torch_level = at::get_cpu_capability();
#if defined(FUSED_BACKPROP_HAVE_AVX512)
  if (torch_level == "AVX512") return AVX512::kernels;
#endif
#if defined(FUSED_BACKPROP_HAVE_AVX2)
  if (torch_level == "AVX512" || torch_level == "AVX2") return AVX2::kernels;
#endif
#endif
  return DEFAULT::kernels;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels& chosen = choose();
  return chosen;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long size = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (size <= 0) {  // sysfs, as "1024K"
      std::ifstream in("/sys/devices/system/cpu/cpu0/cache/index2/size");
      std::string text;
      if (in >> text && std::isdigit(static_cast<unsigned char>(text[0]))) {
        size = std::stol(text) * (text.back() == 'K' ? 1024 : text.back() == 'M' ? 1024 * 1024 : 1);
      }
    }
    return size > 0 ? int64_t(size) : int64_t(1) << 20;
  }();
  return bytes;
}

}  // namespace fused_backprop::cpu
