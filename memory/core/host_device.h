// KVTIER_HOST_DEVICE: marks a helper that host and device code both call from one definition, so
// the CPU and CUDA backends compute the same values bit for bit (k-means draws, DBAC bounds).
#pragma once

#if defined(__CUDACC__)
#define KVTIER_HOST_DEVICE __host__ __device__
#else
#define KVTIER_HOST_DEVICE
#endif
