// What this CPU and OS run (cpu_features.h), within the cap a process may set on oneDNN's instruction sets
// (ONEDNN_MAX_CPU_ISA, read once): capped, cmfast's kernels step down with torch's, so one variable makes an AMX
// machine run like one without AMX (say, to see what a CPU of the other class would choose).
#include "cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace cmfast {
namespace {

// The levels of cmfast's CPU kernels, in order.
enum class Level { kNone, kAvx512, kAvx512Bf16, kAmx };

// The highest level oneDNN's ISA cap allows: its names that include AMX allow everything; AVX512_CORE_BF16,
// AVX512_CORE_FP16 and AVX10_1_512 the bf16 dot products; AVX512_CORE and AVX512_CORE_VNNI AVX-512 alone; the
// AVX2 and older names nothing of cmfast's. Unset, ALL, DEFAULT or a name oneDNN does not know: no cap.
Level isa_cap() {
  const char* raw = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (raw == nullptr) raw = std::getenv("DNNL_MAX_CPU_ISA");  // its former name
  if (raw == nullptr) return Level::kAmx;
  std::string name(raw);
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
  if (name.find("AMX") != std::string::npos) return Level::kAmx;
  if (name == "AVX512_CORE_BF16" || name == "AVX512_CORE_FP16" || name == "AVX10_1_512") return Level::kAvx512Bf16;
  if (name == "AVX512_CORE" || name == "AVX512_CORE_VNNI") return Level::kAvx512;
  if (name == "SSE41" || name == "AVX" || name == "AVX2" || name == "AVX2_VNNI" || name == "AVX2_VNNI_2") {
    return Level::kNone;
  }
  return Level::kAmx;
}

bool allowed(Level level) {
  static const Level cap = isa_cap();
  return level <= cap;
}

// AMX-TILE and AMX-BF16 in CPUID (leaf 7, EDX bits 24 and 22), and Linux's permission for this process to use the
// tile registers (requested once: the kernel grants it where the OS saves the tile state).
bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

}  // namespace

bool cpu_runs_avx512() {
  return allowed(Level::kAvx512) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

bool cpu_runs_avx512_bf16() {
  return allowed(Level::kAvx512Bf16) && cpu_runs_avx512() && __builtin_cpu_supports("avx512bf16");
}

bool cpu_runs_amx_bf16() {
  static const bool usable = allowed(Level::kAmx) && amx_usable();
  return usable;
}

}  // namespace cmfast
