// What the CPU kernels read off the machine, once: which SIMD level runs (as ATen chooses its own)
// and the cache sizes their panels and chunks are sized by.
#include <ATen/Version.h>

#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

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

// The cache cpu0 sees, from sysfs (as "32768K"), else sysconf, else `fallback`. sysfs first: on
// AMD EPYC glibc's sysconf gives the whole package's L3 (384 MiB) where a core shares 32 MiB.
int64_t cache_bytes(const char* sysfs_index, int sysconf_name, int64_t fallback) {
  long size = -1;
  std::ifstream in(std::string("/sys/devices/system/cpu/cpu0/cache/") + sysfs_index + "/size");
  std::string text;
  if (in >> text && std::isdigit(static_cast<unsigned char>(text[0]))) {
    size = std::stol(text) * (text.back() == 'K' ? 1024 : text.back() == 'M' ? 1024 * 1024 : 1);
  }
  if (size <= 0 && sysconf_name >= 0) size = sysconf(sysconf_name);
  return size > 0 ? int64_t(size) : fallback;
}

#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
constexpr int kSysconfL2 = _SC_LEVEL2_CACHE_SIZE, kSysconfL3 = _SC_LEVEL3_CACHE_SIZE;
#else
constexpr int kSysconfL2 = -1, kSysconfL3 = -1;
#endif

bool genuine_intel() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int max_leaf = 0, regs[3] = {0, 0, 0};  // the vendor string is ebx, edx, ecx
  if (__get_cpuid(0, &max_leaf, &regs[0], &regs[2], &regs[1]) == 0) return false;
  return std::memcmp(regs, "GenuineIntel", 12) == 0;
#else
  return false;
#endif
}

// FUSED_BACKPROP_TILE_GEMM: "0" or "1", else null (the CPU decides).
const char* tile_gemm_override() {
  const char* env = std::getenv("FUSED_BACKPROP_TILE_GEMM");
  return env != nullptr && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0) ? env : nullptr;
}

}  // namespace

bool tile_gemm_enabled() {
  static const bool enabled = tile_gemm_override() != nullptr ? tile_gemm_override()[0] == '1' : !genuine_intel();
  return enabled;
}

bool blas_by_default() {
  static const bool by_default = tile_gemm_override() == nullptr && genuine_intel();
  return by_default;
}

const Kernels& kernels() {
  static const Kernels& chosen = choose();
  return chosen;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = cache_bytes("index2", kSysconfL2, int64_t(1) << 20);
  return bytes;
}

int64_t l3_cache_bytes() {
  static const int64_t bytes = cache_bytes("index3", kSysconfL3, int64_t(32) << 20);
  return bytes;
}

}  // namespace fused_backprop::cpu
