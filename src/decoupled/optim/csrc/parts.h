// What every step file (adam.cpp, int8.cpp, sgd.cpp) includes first: the standard and ATen
// headers, steps.h, and the shared parts in an anonymous namespace (internal to each unit):
// arithmetic.h (per-element arithmetic), compensated.h (bfloat16/float16 master weights) and
// tensor_lists.h (checks and chunks over lists of tensors).

#pragma once

#include <ATen/Parallel.h>

#include "steps.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#include "arithmetic.h"
#include "compensated.h"
#include "tensor_lists.h"

}  // namespace
