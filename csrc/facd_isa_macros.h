// Included right after the `#pragma GCC target(...)` of an instruction-set
// translation unit (facd_kernels_avx2.cpp, facd_kernels_avx512.cpp), before
// facd_kernels.h. The pragma enables the instructions but not their feature
// macros, which ATen's and Sleef's headers test to declare their vector code;
// this defines them: the AVX2 set always, the AVX-512 set with
// CPU_CAPABILITY_AVX512.
#pragma once

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

#ifdef CPU_CAPABILITY_AVX512
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
#endif
