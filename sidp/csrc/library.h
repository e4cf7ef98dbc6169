// What every kernel source includes: the stable-ABI headers, and op registration under the namespace the
// build names (SIDP_NS: one per instruction-set path, see sidp/model/cpu_kernels.py).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#ifndef SIDP_NS
#define SIDP_NS sidp_native
#endif
// One more level of macro, so that SIDP_NS is expanded before the stable macros paste it into names.
#define SIDP_LIBRARY_FRAGMENT(ns, m) STABLE_TORCH_LIBRARY_FRAGMENT(ns, m)
#define SIDP_LIBRARY_IMPL(ns, k, m) STABLE_TORCH_LIBRARY_IMPL(ns, k, m)
