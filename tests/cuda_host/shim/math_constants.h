// Host stand-in (tests/cuda_host/): the one constant the kernels use.
#pragma once
#define CUDART_INF_F INFINITY
