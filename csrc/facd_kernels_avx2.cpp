// The AVX2 + FMA instance of facd_kernels.h, chosen at run time when the CPU
// has them (facd_cpu.cpp). The target pragma, not a command-line flag, enables
// the instructions, so one set of compiler flags (facd_build.cxx_flags) builds
// every source and the rest of the extension stays portable.
#include "facd_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "facd_isa_macros.h"
#include "facd_kernels.h"

const facd::KernelTable* facd::avx2_kernels() { return facd::AVX2::kernel_table(); }
#else
const facd::KernelTable* facd::avx2_kernels() { return nullptr; }
#endif
