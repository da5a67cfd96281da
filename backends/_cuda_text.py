"""What every generated CUDA source shares (:mod:`._cuda`, :mod:`._cuda_factored`): the
operations' definitions and the number of accumulator slots a reduction adds into."""

__all__ = ["PRELUDE", "REDUCTION_SLOTS"]

#: Accumulator slots per reduction (one per lane of a warp).
REDUCTION_SLOTS = 32

#: The operations every kernel may call, as overloads for each element type.
PRELUDE = """\
#ifndef OPTIM_CORE_PRELUDE
#define OPTIM_CORE_PRELUDE
__host__ __device__ inline float oc_sqrt(float x) { return sqrtf(x); }
__host__ __device__ inline double oc_sqrt(double x) { return sqrt(x); }
__host__ __device__ inline float oc_abs(float x) { return fabsf(x); }
__host__ __device__ inline double oc_abs(double x) { return fabs(x); }
// NaN propagates from either side, as xp.maximum and xp.minimum do (fmax, fmin drop it).
template <typename T>
__host__ __device__ inline T oc_maximum(T a, T b) { return (a >= b || a != a) ? a : b; }
template <typename T>
__host__ __device__ inline T oc_minimum(T a, T b) { return (a <= b || a != a) ? a : b; }
// where(condition, a, b): both sides computed, one selected (no divergent branch).
template <typename T>
__host__ __device__ inline T oc_where(bool condition, T a, T b) { return condition ? a : b; }
// sign(0) = 0 and sign(NaN) = NaN, as xp.sign.
template <typename T>
__host__ __device__ inline T oc_sign(T x) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}
#endif
"""
