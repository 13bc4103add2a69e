// Host stand-in (tests/cuda_host/): the constants the kernels use.
#pragma once
#include <cmath>
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
