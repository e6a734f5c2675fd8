// The AVX-512 instance of facd_kernels.h (F, BW, VL, DQ), chosen at run time
// when the CPU has them (facd_cpu.cpp); see facd_kernels_avx2.cpp.
#include "facd_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "facd_isa_macros.h"
#include "facd_kernels.h"

const facd::KernelTable* facd::avx512_kernels() { return facd::AVX512::kernel_table(); }
#else
const facd::KernelTable* facd::avx512_kernels() { return nullptr; }
#endif
