// CPU-only: compile hot loops for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64,
// with the best version picked at load time (GCC function multi-versioning). Other compilers
// and targets get the plain function.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYB_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYB_MULTIVERSION
#endif
