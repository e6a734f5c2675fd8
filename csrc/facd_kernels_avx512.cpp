// The AVX-512 instance of facd_kernels.h (F, BW, VL, DQ), chosen at run time
// when the CPU has them (facd_cpu.cpp); see facd_kernels_avx2.cpp.
#include "facd_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "facd_kernels.h"

const facd::KernelTable* facd::avx512_kernels() { return facd::AVX512::kernel_table(); }
#else
const facd::KernelTable* facd::avx512_kernels() { return nullptr; }
#endif
