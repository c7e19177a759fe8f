// Whether this process may run AMX tile instructions (amx.h).
#include "amx.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace cmfast {
namespace {

// AMX-TILE and AMX-BF16 in CPUID (leaf 7, EDX bits 24 and 22), and Linux's permission for this process to use the
// tile registers (requested once: the kernel grants it where the OS saves the tile state).
bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

}  // namespace

bool cpu_runs_amx_bf16() {
  static const bool usable = amx_usable();
  return usable;
}

}  // namespace cmfast
