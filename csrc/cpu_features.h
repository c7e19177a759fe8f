// What this CPU (and its OS) runs, for the kernels that need more than the build's baseline ISA: each is compiled
// for its ISA with target attributes and registered or chosen only where these say the CPU runs it.
#pragma once

namespace cmfast {

bool cpu_runs_avx512();       // AVX-512 F, BW, DQ and VL
bool cpu_runs_avx512_bf16();  // and AVX512_BF16 (vdpbf16ps: bf16 pair dot products)
bool cpu_runs_amx_bf16();     // AMX-TILE and AMX-BF16, with the OS's permission to use the tiles (asked for once)

}  // namespace cmfast
