// Forward declarations of the CUDA runtime handle types, so public headers can name streams and
// events without including cuda_runtime.h (and build without CUDA at all).
#pragma once

struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
