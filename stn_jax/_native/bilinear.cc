// Native CPU kernels of stn_jax.bilinear_sample (forward and backward) for the XLA FFI.
//
// The semantics are exactly those of the pure-JAX reference in stn_jax/sampling.py (torch
// grid_sample conventions): the same coordinate formulas in the same order of operations (the
// file is compiled with -ffp-contract=off so that no FMA changes a rounding), the same
// padding modes, the same treatment of non-finite and huge grid values and the same one-sided
// (floor) derivative at integer coordinates. The reference is what the tests compare against.
// The sampled values agree with it to float rounding (the AVX-512 forward blends with explicit
// fused multiply-adds, exact where a weight is 0 or 1, e.g. identity warps).
//
// Layout: image (*L, H, W, C), grid (*L, *S, 2), output (*L, *S, C), row-major; *L (the batch,
// and any vmapped axes) is the same in every operand, the N = prod(*S) points of each image are
// contiguous.
//
// Work is split over the XLA intra-op thread pool: the forward over chunks of output points,
// the backward over chunks of whole images (each image's gradient is owned by one task, so the
// scatter-add needs no atomics and the result is deterministic). The handlers return an FFI
// future, completed before they return: waiting for a pending one cost XLA more (thread
// hand-offs) than the caller's short wait for the last chunks (docs/performance.md).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Padding : int32_t { kZeros = 0, kBorder = 1, kReflection = 2 };

constexpr double kMaxAbsGrid = 1e6;  // must equal sampling._MAX_ABS_GRID

// A pixel coordinate and its derivative with respect to the normalised grid value. The helpers
// take and return values (no references), which keeps the point loop vectorisable.
template <typename T>
struct Coord {
  T x, d;
};

// Where-based clamp with a zero derivative at and beyond the limits.
template <typename T>
inline Coord<T> Clamp(Coord<T> c, T lo, T hi) {
  const bool inside = (c.x > lo) & (c.x < hi);
  return {c.x <= lo ? lo : (c.x >= hi ? hi : c.x), inside ? c.d : T(0)};
}

// torch's reflect_coordinates, as sampling._reflect.
template <typename T>
inline Coord<T> Reflect(Coord<T> c, int64_t twice_low, int64_t twice_high) {
  if (twice_low == twice_high) return {T(0), T(0)};
  const T low = T(double(twice_low) / 2);
  const T span = T(double(twice_high - twice_low) / 2);
  T x = c.x - low;
  const T sign = x < T(0) ? T(-1) : T(1);
  x = std::fabs(x);
  const T extra = std::fmod(x, span);
  const T flips = std::floor(x / span);
  const bool odd = std::fmod(flips, T(2)) == T(1);
  return {odd ? span - extra + low : extra + low, c.d * (odd ? -sign : sign)};
}

// Snaps a coordinate within float rounding of an integer onto it, as
// sampling._snap_to_integers (round half to even; the derivative passes through).
template <typename T>
inline T SnapToIntegers(T x, int64_t size) {
  const T tol = T(2 * double(std::numeric_limits<T>::epsilon()) * double(size + 1));
  const T nearest = std::nearbyint(x);
  return std::fabs(x - nearest) <= tol ? x + (nearest - x) : x;
}

// Normalised g (finite, clamped) -> pixel coordinate and its derivative, as
// sampling._source_coord.
template <typename T, int32_t kPad, bool kAlign>
inline Coord<T> SourceCoord(T g, int64_t size) {
  Coord<T> c;
  if (kAlign) {
    c = {(g + T(1)) / T(2) * T(size - 1), T(double(size - 1) / 2)};
  } else {
    c = {((g + T(1)) * T(size) - T(1)) / T(2), T(double(size) / 2)};
  }
  c.x = SnapToIntegers(c.x, size);
  if (kPad == kZeros) return Clamp(c, T(-2), T(size + 1));
  if (kPad == kReflection) {
    c = kAlign ? Reflect(c, 0, 2 * (size - 1)) : Reflect(c, -1, 2 * size - 1);
  }
  return Clamp(c, T(0), T(size - 1));
}

// Points are processed in blocks of kBlock: a first loop computes the taps of the whole block
// into structure-of-arrays buffers (ComputeTapsVector for float32 in zeros / border mode, 16
// points per step; the scalar loop below for float64 and the reflection mode, whose fmod has
// no vector form), a second loop reads the image (vectorised over points with gathers for a
// compile-time channel count) or scatter-adds into its gradient.
constexpr int64_t kBlock = 256;

template <typename T>
struct alignas(64) Block {
  T w[4][kBlock];         // bilinear weights, 0 for taps outside the image or non-finite points
  int32_t off[4][kBlock];  // y0x0, y0x1, y1x0, y1x1 pixel offsets, clamped into the image
  T m[4][kBlock];         // 1 where the tap is inside the image (and the point finite), else 0
  T wx0[kBlock], wx1[kBlock], wy0[kBlock], wy1[kBlock];
  T dx[kBlock], dy[kBlock];  // d(pixel coordinate) / d(grid), 0 where the point is not finite
};

// Eq. (6) for a block of points with kC > 0 channels: adds w[q] * cotangent into the image
// gradient at each tap's offset. Sequential: taps of different points collide.
template <typename T, int kC>
inline void ScatterAddTaps(const Block<T>& t, const T* cot, T* dimg, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    for (int q = 0; q < 4; ++q) {
      T* d = dimg + int64_t(t.off[q][i]) * kC;
      const T wq = t.w[q][i];
      for (int k = 0; k < kC; ++k) d[k] += wq * cot[i * kC + k];
    }
  }
}

// Clamps an integer-valued float index into [0, size - 1].
template <typename T>
inline T ClampF(T i, T size) {
  return i < T(0) ? T(0) : (i > size - T(1) ? size - T(1) : i);
}

template <typename T, int32_t kPad, bool kAlign, bool kGradient>
inline void ComputeTapsScalar(const T* grid, int64_t count, int64_t h, int64_t w, Block<T>& t) {
  const T max_abs = T(kMaxAbsGrid);
  const T big = std::numeric_limits<T>::max();
  const int32_t wi = int32_t(w);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const T gx = grid[2 * i], gy = grid[2 * i + 1];
    // isfinite without a call: NaN and +-inf fail the comparison.
    const bool finite = (std::fabs(gx) <= big) & (std::fabs(gy) <= big);
    const Coord<T> cx = Clamp(Coord<T>{finite ? gx : T(0), T(1)}, -max_abs, max_abs);
    const Coord<T> cy = Clamp(Coord<T>{finite ? gy : T(0), T(1)}, -max_abs, max_abs);
    const Coord<T> sx = SourceCoord<T, kPad, kAlign>(cx.x, w);
    const Coord<T> sy = SourceCoord<T, kPad, kAlign>(cy.x, h);
    const T x = sx.x, y = sy.x;
    const T x0f = std::floor(x), y0f = std::floor(y);
    const T wx1 = x - x0f, wy1 = y - y0f;
    const T wx0 = T(1) - wx1, wy0 = T(1) - wy1;
    // Validity and clamping in floating point, as in TapsVector (x0f is an integer in
    // [-2, size + 1] after the clamps above, so every comparison is exact).
    const T wf = T(w), hf = T(h);
    const bool vx0 = (x0f >= T(0)) & (x0f < wf), vx1 = (x0f >= T(-1)) & (x0f < wf - T(1));
    const bool vy0 = (y0f >= T(0)) & (y0f < hf) & finite;
    const bool vy1 = (y0f >= T(-1)) & (y0f < hf - T(1)) & finite;
    const int32_t cx0 = int32_t(ClampF(x0f, wf)), cx1 = int32_t(ClampF(x0f + T(1), wf));
    const int32_t cy0 = int32_t(ClampF(y0f, hf)), cy1 = int32_t(ClampF(y0f + T(1), hf));
    t.off[0][i] = cy0 * wi + cx0;
    t.off[1][i] = cy0 * wi + cx1;
    t.off[2][i] = cy1 * wi + cx0;
    t.off[3][i] = cy1 * wi + cx1;
    const bool v00 = vy0 & vx0, v01 = vy0 & vx1, v10 = vy1 & vx0, v11 = vy1 & vx1;
    t.w[0][i] = v00 ? wy0 * wx0 : T(0);
    t.w[1][i] = v01 ? wy0 * wx1 : T(0);
    t.w[2][i] = v10 ? wy1 * wx0 : T(0);
    t.w[3][i] = v11 ? wy1 * wx1 : T(0);
    if (kGradient) {
      t.m[0][i] = v00 ? T(1) : T(0);
      t.m[1][i] = v01 ? T(1) : T(0);
      t.m[2][i] = v10 ? T(1) : T(0);
      t.m[3][i] = v11 ? T(1) : T(0);
      t.wx0[i] = wx0;
      t.wx1[i] = wx1;
      t.wy0[i] = wy0;
      t.wy1[i] = wy1;
      t.dx[i] = finite ? sx.d * cx.d : T(0);
      t.dy[i] = finite ? sy.d * cy.d : T(0);
    }
  }
}

// The same computation for float32 in zeros / border mode, written with GCC/Clang vector
// extensions, kLanes points at a time (GCC does not vectorise the scalar loop: its selects
// and float/int conversions defeat it). The operations and their order are those of the scalar
// code, so the results are the same up to the sign of a zero weight; floor and
// round-to-nearest are built from conversions, which are exact in the ranges where they are
// used (see below).
// 16 lanes (one zmm register) with AVX-512; 8 (one ymm register) otherwise: 16-lane vectors
// split over two ymm registers spill to memory (docs/performance.md has the timings).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// Everything on vectors is force-inlined: a call would pass them (and TapsV) through memory.
#define STN_INLINE inline __attribute__((always_inline))
typedef float VF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VI __attribute__((vector_size(4 * kLanes)));

typedef uint32_t VU __attribute__((vector_size(4 * kLanes)));

template <typename V>
STN_INLINE V LoadV(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
STN_INLINE void StoreV(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}


STN_INLINE VF Select(VI mask, VF a, VF b) { return mask ? a : b; }
STN_INLINE VI ClampI(VI i, VI hi) {
  const VI lo = i < 0 ? VI{} : i;
  return lo > hi ? hi : lo;
}
STN_INLINE VF Fabs(VF x) { return (VF)((VI)x & 0x7fffffff); }
STN_INLINE VF ToFloat(VI i) { return __builtin_convertvector(i, VF); }
STN_INLINE VI ToInt(VF x) { return __builtin_convertvector(x, VI); }  // truncates

#if defined(__AVX__)
// Rounding with the CPU's round instruction (mode: _MM_FROUND_*).
template <int kMode>
STN_INLINE VF RoundV(VF x) {
#if defined(__AVX512F__)
  __m512 v;
  std::memcpy(&v, &x, sizeof(v));
  v = _mm512_roundscale_ps(v, kMode | _MM_FROUND_NO_EXC);
  return LoadV<VF>(&v);
#else
  __m256 v;
  std::memcpy(&v, &x, sizeof(v));
  v = _mm256_round_ps(v, kMode | _MM_FROUND_NO_EXC);
  return LoadV<VF>(&v);
#endif
}
#endif

// floor (portable form for |x| < 2^31; callers clamp x to a few pixels beyond the image first).
STN_INLINE VF Floor(VF x) {
#if defined(__AVX__)
  return RoundV<_MM_FROUND_TO_NEG_INF>(x);
#else
  const VF t = ToFloat(ToInt(x));
  return t - Select(t > x, VF{} + 1.0f, VF{});
#endif
}

// Round half to even. Portable form: exact for |x| < 2^22 by the 1.5 * 2^23 trick; larger
// floats are within 0.5 of an integer only if they are integers or halves, where the snap
// below never applies (its tolerance is far below 0.5), so x itself serves.
STN_INLINE VF Nearest(VF x) {
#if defined(__AVX__)
  return RoundV<_MM_FROUND_TO_NEAREST_INT>(x);
#else
  const VF magic = VF{} + 12582912.0f;
  const VF r = (x + magic) - magic;
  return Select(Fabs(x) < 4194304.0f, r, x);
#endif
}

STN_INLINE VF ClampV(VF x, VI& inside, float lo, float hi) {
  inside = (x > lo) & (x < hi);
  return Select(x <= lo, VF{} + lo, Select(x >= hi, VF{} + hi, x));
}

template <int32_t kPad, bool kAlign>
STN_INLINE VF SourceCoordV(VF g, int64_t size, VF& deriv) {
  VF x;
  if (kAlign) {
    x = (g + 1.0f) / 2.0f * float(size - 1);
    deriv = VF{} + float(double(size - 1) / 2);
  } else {
    x = ((g + 1.0f) * float(size) - 1.0f) / 2.0f;
    deriv = VF{} + float(double(size) / 2);
  }
  const float tol = float(2 * double(std::numeric_limits<float>::epsilon()) * double(size + 1));
  const VF nearest = Nearest(x);
  x = Select(Fabs(x - nearest) <= tol, x + (nearest - x), x);
  VI inside;
  if (kPad == kZeros) {
    x = ClampV(x, inside, -2.0f, float(size + 1));
  } else {
    x = ClampV(x, inside, 0.0f, float(size - 1));
  }
  deriv = Select(inside, deriv, VF{});
  return x;
}

// The taps of kLanes points, as ComputeTapsScalar computes them one by one.
struct TapsV {
  VI off[4];    // y0x0, y0x1, y1x0, y1x1 pixel offsets, clamped into the image
  VF w[4];      // bilinear weights, 0 for taps outside the image or non-finite points
  VI valid[4];  // -1 where the tap is inside the image and the point finite, else 0
  VF wx0, wx1, wy0, wy1;
  VF dx, dy;    // d(pixel coordinate) / d(grid), 0 where the point is not finite
};

template <int32_t kPad, bool kAlign>
STN_INLINE TapsV TapsVector(VF gx, VF gy, int64_t h, int64_t w) {
  const float big = std::numeric_limits<float>::max();
  const VF one = VF{} + 1.0f, zero = VF{};
  TapsV t;
  const VI finite = (Fabs(gx) <= big) & (Fabs(gy) <= big);
  // The clamp of finite values to +-kMaxAbsGrid is left out: in zeros and border modes such a
  // point lands beyond the image edge either way, with the same value and a zero derivative
  // (overflow to +-inf included: the padding clamp maps it to the same edge).
  gx = Select(finite, gx, zero);
  gy = Select(finite, gy, zero);
  const VF x = SourceCoordV<kPad, kAlign>(gx, w, t.dx);
  const VF y = SourceCoordV<kPad, kAlign>(gy, h, t.dy);
  t.dx = Select(finite, t.dx, zero);
  t.dy = Select(finite, t.dy, zero);
  const VF x0f = Floor(x), y0f = Floor(y);
  t.wx1 = x - x0f;
  t.wy1 = y - y0f;
  t.wx0 = one - t.wx1;
  t.wy0 = one - t.wy1;
  // Integer taps; x0f, y0f are in [-2, size + 1], so the conversions are exact. A tap is valid
  // if 0 <= i < size, one unsigned comparison.
  const VI ix0 = ToInt(x0f), iy0 = ToInt(y0f);
  const VU wu = VU{} + uint32_t(w), hu = VU{} + uint32_t(h);
  const VI vx0 = (VU)ix0 < wu, vx1 = (VU)(ix0 + 1) < wu;
  const VI vy0 = ((VU)iy0 < hu) & finite, vy1 = ((VU)(iy0 + 1) < hu) & finite;
  // Offsets: the exact pixel for a valid tap, and for an invalid one (weight 0) any pixel
  // inside the image, here the row-major offset clamped into [0, h * w - 1].
  const VI base = iy0 * int32_t(w) + ix0;
  const VI last = VI{} + int32_t(h * w - 1);
  t.off[0] = ClampI(base, last);
  t.off[1] = ClampI(base + 1, last);
  t.off[2] = ClampI(base + int32_t(w), last);
  t.off[3] = ClampI(base + int32_t(w + 1), last);
  t.valid[0] = vy0 & vx0;
  t.valid[1] = vy0 & vx1;
  t.valid[2] = vy1 & vx0;
  t.valid[3] = vy1 & vx1;
  t.w[0] = Select(t.valid[0], t.wy0 * t.wx0, zero);
  t.w[1] = Select(t.valid[1], t.wy0 * t.wx1, zero);
  t.w[2] = Select(t.valid[2], t.wy1 * t.wx0, zero);
  t.w[3] = Select(t.valid[3], t.wy1 * t.wx1, zero);
  return t;
}

// (x, y) pairs of kLanes points -> x and y vectors.
STN_INLINE void Deinterleave(const float* xy, VF& x, VF& y) {
  const VF a = LoadV<VF>(xy), b = LoadV<VF>(xy + kLanes);
#if defined(__clang__) && defined(__AVX512F__)
  x = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  y = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(__clang__)
  x = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
  y = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#elif defined(__AVX512F__)
  x = __builtin_shuffle(a, b, VI{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
  y = __builtin_shuffle(a, b, VI{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
#else
  x = __builtin_shuffle(a, b, VI{0, 2, 4, 6, 8, 10, 12, 14});
  y = __builtin_shuffle(a, b, VI{1, 3, 5, 7, 9, 11, 13, 15});
#endif
}

template <int32_t kPad, bool kAlign, bool kGradient>
inline void ComputeTapsVector(const float* grid, int64_t count, int64_t h, int64_t w,
                              Block<float>& t) {
  alignas(64) float tail[2 * kLanes];
  const VF one = VF{} + 1.0f, zero = VF{};
  for (int64_t i = 0; i < count; i += kLanes) {
    const float* xy = grid + 2 * i;
    if (i + kLanes > count) {  // the last, partial group reads zeros past the end
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, xy, sizeof(float) * 2 * (count - i));
      xy = tail;
    }
    VF gx, gy;
    Deinterleave(xy, gx, gy);
    const TapsV v = TapsVector<kPad, kAlign>(gx, gy, h, w);
    for (int q = 0; q < 4; ++q) {
      StoreV(t.off[q] + i, v.off[q]);
      StoreV(t.w[q] + i, v.w[q]);
    }
    if (kGradient) {
      for (int q = 0; q < 4; ++q) StoreV(t.m[q] + i, Select(v.valid[q], one, zero));
      StoreV(t.wx0 + i, v.wx0);
      StoreV(t.wx1 + i, v.wx1);
      StoreV(t.wy0 + i, v.wy0);
      StoreV(t.wy1 + i, v.wy1);
      StoreV(t.dx + i, v.dx);
      StoreV(t.dy + i, v.dy);
    }
  }
}

#if !defined(__AVX512F__)
// img[idx] for kLanes indices.
STN_INLINE VF Gather(const float* img, VI idx) {
#if defined(__AVX2__)
  __m256i i;
  std::memcpy(&i, &idx, sizeof(i));
  const __m256 r = _mm256_i32gather_ps(img, i, 4);
  return LoadV<VF>(&r);
#else
  VF r;
  for (int k = 0; k < kLanes; ++k) r[k] = img[idx[k]];
  return r;
#endif
}

// Forward of one channel, float32, zeros / border, on CPUs without AVX-512 (ForwardAvx512
// below replaces it there): taps and gathers in one pass, nothing stored between them. (The
// same for three channels, with stride-3 gathers and the channels interleaved lane by lane,
// was slower than the block-wise loop; so was fusing the backward, whose scatter-add bounds
// it.)
template <int32_t kPad, bool kAlign>
inline void ForwardFusedC1(const float* img, const float* grid, float* out, int64_t count,
                           int64_t h, int64_t w) {
  alignas(64) float tail[2 * kLanes];
  for (int64_t i = 0; i < count; i += kLanes) {
    const float* xy = grid + 2 * i;
    const int64_t n = std::min<int64_t>(kLanes, count - i);
    if (n < kLanes) {  // the last, partial group reads zeros past the end
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, xy, sizeof(float) * 2 * n);
      xy = tail;
    }
    VF gx, gy;
    Deinterleave(xy, gx, gy);
    const TapsV v = TapsVector<kPad, kAlign>(gx, gy, h, w);
    const VF o = v.w[0] * Gather(img, v.off[0]) + v.w[1] * Gather(img, v.off[1]) +
                 v.w[2] * Gather(img, v.off[2]) + v.w[3] * Gather(img, v.off[3]);
    if (n < kLanes) {
      std::memcpy(out + i, &o, sizeof(float) * n);
    } else {
      StoreV(out + i, o);
    }
  }
}
#endif  // !__AVX512F__

#if defined(__AVX512F__)
// The forward of 16 float32 points in zeros / border mode with AVX-512 intrinsics: the fewest
// instructions that give the reference's taps. The coordinates are computed with the
// reference's operations in its order (so the same taps are picked at integer coordinates);
// validity lives in mask registers and the four taps are read with masked gathers (a tap
// outside the image reads 0 and no memory), all from one row-major offset with the pointer
// moved by 1, w and w + 1. Compared with TapsVector this drops the offset clamps, the weight
// selects and the float/int round trips: the forward costs about half as much per point.
struct Taps512 {
  __m512i base;                 // y0 * w + x0 (meaningful where a tap is valid)
  __mmask16 k00, k01, k10, k11;  // valid taps (finite point, inside the image)
  __m512 fx, fy;                // x - x0, y - y0
};

// The floor x0 of the pixel coordinate x of normalised g and the fraction x - x0, as
// sampling._source_coord and the reference's taps compute them (the derivative is not needed
// here).
template <int32_t kPad, bool kAlign>
STN_INLINE void Coord512(__m512 g, int64_t size, __m512& x0, __m512& frac) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  // x / 2 is computed as x * 0.5, the same value.
  __m512 x;
  if (kAlign) {
    x = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(g, one), half), _mm512_set1_ps(float(size - 1)));
  } else {
    x = _mm512_mul_ps(
        _mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(g, one), _mm512_set1_ps(float(size))), one), half);
  }
  // The reference snaps x to the nearest integer n within tol, then takes its floor.
  const float tol = float(2 * double(std::numeric_limits<float>::epsilon()) * double(size + 1));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (kPad == kZeros) {
    // With d = x - n (exact): x0 = n and frac = d above n + tol, x0 = n - 1 and frac = d + 1
    // (the same rounding of the same number as x - (n - 1)) below n - tol, x0 = n and frac = 0
    // in between (the snap). Non-finite and huge points need none of the reference's clamps:
    // NaN, inf - inf and huge d fail both comparisons (frac 0), and x0 converts to int32
    // exactly or (NaN, beyond +-2^31) to INT_MIN, both outside any image for the unsigned
    // validity test; the reference's clamp of x to [-2, size + 1] only moves points whose
    // taps are all outside.
    const __m512 d = _mm512_sub_ps(x, n);
    const __mmask16 below = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-tol), _CMP_LT_OQ);
    const __mmask16 above = _mm512_cmp_ps_mask(d, _mm512_set1_ps(tol), _CMP_GT_OQ);
    x0 = _mm512_mask_sub_ps(n, below, n, one);
    frac = _mm512_mask_add_ps(_mm512_maskz_mov_ps(above, d), below, d, one);
  } else {
    // Border: snap, clamp into [0, size - 1] (max(NaN, 0) is 0; non-finite points are
    // masked out by the caller), floor.
    const __mmask16 snap =
        _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(x, n)), _mm512_set1_ps(tol), _CMP_LE_OQ);
    x = _mm512_mask_mov_ps(x, snap, n);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_setzero_ps()), _mm512_set1_ps(float(size - 1)));
    x0 = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    frac = _mm512_sub_ps(x, x0);
  }
}

template <int32_t kPad, bool kAlign>
STN_INLINE Taps512 TapsForward512(__m512 gx, __m512 gy, int64_t h, int64_t w) {
  Taps512 t;
  __mmask16 finite = 0xffff;
  if (kPad != kZeros) {
    // QNaN, +inf, -inf, SNaN (zeros mode sends them outside the image instead).
    finite = _mm512_kor(_mm512_fpclass_ps_mask(gx, 0x99), _mm512_fpclass_ps_mask(gy, 0x99));
    finite = _mm512_knot(finite);
  }
  __m512 x0, y0;
  Coord512<kPad, kAlign>(gx, w, x0, t.fx);
  Coord512<kPad, kAlign>(gy, h, y0, t.fy);
  const __m512i ix0 = _mm512_cvttps_epi32(x0), iy0 = _mm512_cvttps_epi32(y0);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i wv = _mm512_set1_epi32(int32_t(w)), hv = _mm512_set1_epi32(int32_t(h));
  // A tap is valid if 0 <= i < size: one unsigned comparison.
  const __mmask16 vy0 = _mm512_mask_cmplt_epu32_mask(finite, iy0, hv);
  const __mmask16 vy1 = _mm512_mask_cmplt_epu32_mask(finite, _mm512_add_epi32(iy0, one), hv);
  const __m512i ix1 = _mm512_add_epi32(ix0, one);
  t.k00 = _mm512_mask_cmplt_epu32_mask(vy0, ix0, wv);
  t.k01 = _mm512_mask_cmplt_epu32_mask(vy0, ix1, wv);
  t.k10 = _mm512_mask_cmplt_epu32_mask(vy1, ix0, wv);
  t.k11 = _mm512_mask_cmplt_epu32_mask(vy1, ix1, wv);
  t.base = _mm512_add_epi32(_mm512_mullo_epi32(iy0, wv), ix0);
  return t;
}

// Bilinear blend of four taps with the weights (1 - f, f): exact where f is 0 or 1.
STN_INLINE __m512 Blend512(__m512 v00, __m512 v01, __m512 v10, __m512 v11, __m512 fx, __m512 fy) {
  const __m512 top = _mm512_fmadd_ps(fx, _mm512_sub_ps(v01, v00), v00);
  const __m512 bottom = _mm512_fmadd_ps(fx, _mm512_sub_ps(v11, v10), v10);
  return _mm512_fmadd_ps(fy, _mm512_sub_ps(bottom, top), top);
}

// Permute tables for 16 points stored interleaved, kC floats a point (kC = 1, 2, 3): float f
// of the run is channel f % kC of point f / kC. Built at compile time.
struct alignas(64) LaneTables {
  int32_t first[3][16];   // load: channel c of the 16 points from the first 32 floats
  int32_t second[3][16];  // load, kC = 3: then the points whose float lies in floats 32-47
  int32_t out_first[3][16];   // store: vector r (floats 16r..16r+15) from channels 0 and 1
  int32_t out_second[3][16];  // store, kC = 3: then channel 2 patched in
};

constexpr LaneTables MakeLaneTables(int c_count) {
  LaneTables t{};
  for (int c = 0; c < c_count; ++c) {
    for (int p = 0; p < 16; ++p) {
      const int f = c_count * p + c;
      t.first[c][p] = f < 32 ? f : 0;
      t.second[c][p] = f < 32 ? p : 16 + (f - 32);
    }
  }
  for (int r = 0; r < c_count; ++r) {
    for (int e = 0; e < 16; ++e) {
      const int f = 16 * r + e, point = f / c_count, channel = f % c_count;
      t.out_first[r][e] = channel == 0 ? point : (channel == 1 ? 16 + point : 0);
      t.out_second[r][e] = channel == 2 ? 16 + point : e;
    }
  }
  return t;
}

template <int kC>
inline constexpr LaneTables kLaneTables = MakeLaneTables(kC);

STN_INLINE __m512i LaneIndex(const int32_t (&row)[16]) { return _mm512_load_si512(row); }

// Loads 16 points of kC (1, 2 or 3) interleaved channels, the first n of them (the rest read
// 0), one vector per channel: the grid (kC = 2, x and y) and the cotangent.
template <int kC>
STN_INLINE void LoadPoints512(const float* in, int64_t n, __m512 (&v)[kC]) {
  static_assert(kC >= 1 && kC <= 3, "channel count");
  if (kC == 1) {
    v[0] = _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), in);
    return;
  }
  __m512 raw[3];
  for (int r = 0; r < kC; ++r) {
    const int64_t m = std::min<int64_t>(16, std::max<int64_t>(0, kC * n - 16 * r));
    raw[r] = _mm512_maskz_loadu_ps(__mmask16((1u << m) - 1), in + 16 * r);
  }
  constexpr const LaneTables& t = kLaneTables<kC>;
  for (int c = 0; c < kC; ++c) {
    v[c] = _mm512_permutex2var_ps(raw[0], LaneIndex(t.first[c]), raw[1]);
    if (kC == 3) v[c] = _mm512_permutex2var_ps(v[c], LaneIndex(t.second[c]), raw[2]);
  }
}

// Stores 16 points of kC (1, 2 or 3) channels (one vector per channel) interleaved, the first
// n of them: the output (kC = 1, 3) and the grid gradient (kC = 2).
template <int kC>
STN_INLINE void StorePoints512(float* out, const __m512 (&o)[kC], int64_t n) {
  static_assert(kC >= 1 && kC <= 3, "channel count");
  if (kC == 1) {
    _mm512_mask_storeu_ps(out, __mmask16((1u << n) - 1), o[0]);
    return;
  }
  constexpr const LaneTables& t = kLaneTables<kC>;
  for (int r = 0; r < kC; ++r) {
    __m512 v = _mm512_permutex2var_ps(o[0], LaneIndex(t.out_first[r]), o[1]);
    if (kC == 3) v = _mm512_permutex2var_ps(v, LaneIndex(t.out_second[r]), o[2]);
    const int64_t m = std::min<int64_t>(16, std::max<int64_t>(0, kC * n - 16 * r));
    _mm512_mask_storeu_ps(out + 16 * r, __mmask16((1u << m) - 1), v);
  }
}

// The four taps of 16 points, each of kC channels: v[q][k] is channel k of tap q (00, 01, 10,
// 11). The two taps of a row are 2 * kC adjacent floats, read as kC 8-byte elements: per row
// kC 8-lane gathers for each half of the points, 2 * kC loads a point where single-float
// gathers need 4 * kC (the gathers being what bounds this loop). A pair is read if either of
// its taps is valid; a tap that is not reads 0 (masked de-interleave). A pair that would reach
// one pixel before or after the image (x0 = -1 in the first row, x0 = w - 1 in the last),
// and any pair of a one-pixel image, sends the whole group to single-float gathers, which
// read only valid taps.
template <int kC>
STN_INLINE void GatherTaps512(const float* img, const Taps512& t, int64_t w, int64_t pixels,
                              __m512 (&v)[4][kC]) {
  const __mmask16 k[4] = {t.k00, t.k01, t.k10, t.k11};
  // Offsets in floats: the row-major pixel offset times kC.
  __m512i index = t.base;
  if (kC == 3) index = _mm512_add_epi32(t.base, _mm512_add_epi32(t.base, t.base));
  const __m512i bottom = _mm512_add_epi32(t.base, _mm512_set1_epi32(int32_t(w)));
  const __mmask16 kt = _mm512_kor(k[0], k[1]), kb = _mm512_kor(k[2], k[3]);
  const __m512i last = _mm512_set1_epi32(int32_t(pixels - 2));
  const __mmask16 outside = _mm512_kor(_mm512_mask_cmpgt_epu32_mask(kt, t.base, last),
                                       _mm512_mask_cmpgt_epu32_mask(kb, bottom, last));
  // (A one-pixel image has no pairs: pixels - 2 wraps to the largest unsigned value.)
  if (__builtin_expect(outside != 0 || pixels < 2, 0)) {
    const int64_t tap[4] = {0, kC, kC * w, kC * (w + 1)};
    for (int q = 0; q < 4; ++q) {
      for (int c = 0; c < kC; ++c) {
        v[q][c] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k[q], index, img + tap[q] + c, 4);
      }
    }
    return;
  }
  const __m256i lo = _mm512_castsi512_si256(index), hi = _mm512_extracti64x4_epi64(index, 1);
  // The two floats of each 8-byte element are two "channels": the kC = 2 load tables.
  const __m512i even = LaneIndex(kLaneTables<2>.first[0]), odd = LaneIndex(kLaneTables<2>.first[1]);
  const __m512d zero = _mm512_setzero_pd();
#pragma GCC unroll 2
  for (int row = 0; row < 2; ++row) {
    const float* src = img + row * kC * w;
    const __mmask16 kr = row == 0 ? kt : kb;
#pragma GCC unroll 4
    for (int j = 0; j < kC; ++j) {
      // Floats 2j and 2j + 1 of the row's 2 * kC, for points 0-7 and 8-15.
      const __m512 a = _mm512_castpd_ps(_mm512_mask_i32gather_pd(zero, __mmask8(kr), lo, src + 2 * j, 4));
      const __m512 b = _mm512_castpd_ps(_mm512_mask_i32gather_pd(zero, __mmask8(kr >> 8), hi, src + 2 * j, 4));
      const int f0 = 2 * j, f1 = 2 * j + 1;  // float f is channel f % kC of tap f / kC
      const int q0 = 2 * row + f0 / kC, q1 = 2 * row + f1 / kC;
      v[q0][f0 % kC] = _mm512_maskz_permutex2var_ps(k[q0], a, even, b);
      v[q1][f1 % kC] = _mm512_maskz_permutex2var_ps(k[q1], a, odd, b);
    }
  }
}

// Forward of kC (1 or 3) channels, float32, zeros / border: taps, gathers and blend in one
// pass over groups of 16 points, nothing stored between them.
template <int32_t kPad, bool kAlign, int kC>
inline void ForwardAvx512(const float* img, const float* grid, float* out, int64_t count,
                          int64_t h, int64_t w) {
  for (int64_t i = 0; i < count; i += 16) {
    const int64_t n = std::min<int64_t>(16, count - i);
    __m512 g[2];  // x, y; the last, partial group reads zeros past the end
    LoadPoints512<2>(grid + 2 * i, n, g);
    const Taps512 t = TapsForward512<kPad, kAlign>(g[0], g[1], h, w);
    __m512 v[4][kC], o[kC];
    GatherTaps512<kC>(img, t, w, h * w, v);
    for (int c = 0; c < kC; ++c) o[c] = Blend512(v[0][c], v[1][c], v[2][c], v[3][c], t.fx, t.fy);
    StorePoints512<kC>(out + kC * i, o, n);
  }
}

// The backward of one block of `count` points of one image, float32, zeros mode, kC (1 or 3)
// channels, in two passes. The first, 16 points at a time in registers (taps and gathers as
// the forward's), writes the grid gradient (eq. 7) and, to the block buffers, each tap's
// weight (0 for a tap outside the image) and offset (clamped into the image); the second adds
// weight * cotangent into the image gradient point by point (eq. 6; taps of different points
// collide, so it stays sequential). The arithmetic of the grid gradient is the reference's,
// in its order, without fused multiply-adds.
template <bool kAlign, int kC>
inline void BackwardBlockAvx512(const float* img, const float* grid, const float* cot,
                                float* dimg, float* dgrid, int64_t count, int64_t h, int64_t w,
                                Block<float>& taps) {
  const int64_t pixels = h * w;
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 dxc = _mm512_set1_ps(float(kAlign ? double(w - 1) / 2 : double(w) / 2));
  const __m512 dyc = _mm512_set1_ps(float(kAlign ? double(h - 1) / 2 : double(h) / 2));
  const __m512i last = _mm512_set1_epi32(int32_t(pixels - 1)), zero_i = _mm512_setzero_si512();
  const __m512i step[4] = {zero_i, _mm512_set1_epi32(1), _mm512_set1_epi32(int32_t(w)),
                           _mm512_set1_epi32(int32_t(w + 1))};
  for (int64_t i = 0; i < count; i += 16) {
    const int64_t n = std::min<int64_t>(16, count - i);
    __m512 g[2];
    LoadPoints512<2>(grid + 2 * i, n, g);
    const Taps512 t = TapsForward512<kZeros, kAlign>(g[0], g[1], h, w);
    __m512 v[4][kC], gk[kC];
    GatherTaps512<kC>(img, t, w, pixels, v);
    LoadPoints512<kC>(cot + kC * i, n, gk);
    const __m512 wx1 = t.fx, wy1 = t.fy;
    const __m512 wx0 = _mm512_sub_ps(one, wx1), wy0 = _mm512_sub_ps(one, wy1);
    __m512 sx = _mm512_setzero_ps(), sy = _mm512_setzero_ps();
    for (int c = 0; c < kC; ++c) {
      const __m512 ax = _mm512_add_ps(_mm512_mul_ps(wy0, _mm512_sub_ps(v[1][c], v[0][c])),
                                      _mm512_mul_ps(wy1, _mm512_sub_ps(v[3][c], v[2][c])));
      const __m512 ay = _mm512_add_ps(_mm512_mul_ps(wx0, _mm512_sub_ps(v[2][c], v[0][c])),
                                      _mm512_mul_ps(wx1, _mm512_sub_ps(v[3][c], v[1][c])));
      sx = _mm512_add_ps(sx, _mm512_mul_ps(gk[c], ax));
      sy = _mm512_add_ps(sy, _mm512_mul_ps(gk[c], ay));
    }
    // d(pixel coordinate) / d(grid) is the constant wherever a tap is valid; elsewhere the sums
    // are 0 (all taps read 0), as the reference's zero derivative makes them.
    const __m512 dg[2] = {_mm512_mul_ps(sx, dxc), _mm512_mul_ps(sy, dyc)};
    StorePoints512<2>(dgrid + 2 * i, dg, n);
    const __mmask16 k[4] = {t.k00, t.k01, t.k10, t.k11};
    const __m512 weight[4] = {_mm512_mul_ps(wy0, wx0), _mm512_mul_ps(wy0, wx1),
                              _mm512_mul_ps(wy1, wx0), _mm512_mul_ps(wy1, wx1)};
    for (int q = 0; q < 4; ++q) {
      _mm512_store_ps(taps.w[q] + i, _mm512_maskz_mov_ps(k[q], weight[q]));
      const __m512i o = _mm512_add_epi32(t.base, step[q]);
      _mm512_store_si512(taps.off[q] + i, _mm512_min_epi32(_mm512_max_epi32(o, zero_i), last));
    }
  }
  ScatterAddTaps<float, kC>(taps, cot, dimg, count);
}
#endif  // __AVX512F__

template <typename T, int32_t kPad, bool kAlign, bool kGradient>
inline void ComputeTaps(const T* grid, int64_t count, int64_t h, int64_t w, Block<T>& t) {
  if constexpr (std::is_same_v<T, float> && kPad != kReflection) {
    ComputeTapsVector<kPad, kAlign, kGradient>(grid, count, h, w, t);
  } else {
    ComputeTapsScalar<T, kPad, kAlign, kGradient>(grid, count, h, w, t);
  }
}

struct Geometry {
  int64_t batch, h, w, c, n;
};

// Output points [begin, end) of the flattened (batch * n) output. kC > 0 is the channel count
// known at compile time (the loops over points then vectorise with gathers), 0 reads g.c.
template <typename T, int32_t kPad, bool kAlign, int kC>
void ForwardRange(const T* image, const T* grid, T* out, const Geometry& g, int64_t begin,
                  int64_t end) {
  const int64_t pixels = g.h * g.w, c = kC > 0 ? kC : g.c;
  Block<T> t;
  for (int64_t p = begin; p < end;) {
    const int64_t b = p / g.n;
    const int64_t stop = std::min({end, (b + 1) * g.n, p + kBlock});
    const int64_t count = stop - p;
    const T* img = image + b * pixels * c;
    T* o = out + p * c;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && (kC == 1 || kC == 3) && kPad != kReflection) {
      ForwardAvx512<kPad, kAlign, kC>(img, grid + 2 * p, o, count, g.h, g.w);
      p = stop;
      continue;
    }
#else
    if constexpr (std::is_same_v<T, float> && kC == 1 && kPad != kReflection) {
      ForwardFusedC1<kPad, kAlign>(img, grid + 2 * p, o, count, g.h, g.w);
      p = stop;
      continue;
    }
#endif
    ComputeTaps<T, kPad, kAlign, false>(grid + 2 * p, count, g.h, g.w, t);
    if (kC > 0) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        for (int k = 0; k < kC; ++k) {
          o[i * kC + k] = t.w[0][i] * img[t.off[0][i] * kC + k] +
                          t.w[1][i] * img[t.off[1][i] * kC + k] +
                          t.w[2][i] * img[t.off[2][i] * kC + k] +
                          t.w[3][i] * img[t.off[3][i] * kC + k];
        }
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const T w0 = t.w[0][i], w1 = t.w[1][i], w2 = t.w[2][i], w3 = t.w[3][i];
        const T* v0 = img + int64_t(t.off[0][i]) * c;
        const T* v1 = img + int64_t(t.off[1][i]) * c;
        const T* v2 = img + int64_t(t.off[2][i]) * c;
        const T* v3 = img + int64_t(t.off[3][i]) * c;
        T* oi = o + i * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) {
          oi[k] = w0 * v0[k] + w1 * v1[k] + w2 * v2[k] + w3 * v3[k];
        }
      }
    }
    p = stop;
  }
}

// Images [begin, end): d_image for those images (zeroed here) and d_grid for their points.
template <typename T, int32_t kPad, bool kAlign, int kC>
void BackwardRange(const T* image, const T* grid, const T* cot, T* d_image, T* d_grid,
                   const Geometry& g, int64_t begin, int64_t end) {
  const int64_t pixels = g.h * g.w, c = kC > 0 ? kC : g.c;
  Block<T> t;
  alignas(64) T gxs[kBlock], gys[kBlock];
  for (int64_t b = begin; b < end; ++b) {
    const T* img = image + b * pixels * c;
    T* dimg = d_image + b * pixels * c;
    std::memset(dimg, 0, sizeof(T) * pixels * c);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && (kC == 1 || kC == 3) && kPad == kZeros) {
      for (int64_t p = b * g.n; p < (b + 1) * g.n; p += kBlock) {
        const int64_t count = std::min((b + 1) * g.n - p, kBlock);
        BackwardBlockAvx512<kAlign, kC>(img, grid + 2 * p, cot + p * kC, dimg, d_grid + 2 * p,
                                        count, g.h, g.w, t);
      }
      continue;
    }
#endif
    for (int64_t p = b * g.n; p < (b + 1) * g.n;) {
      const int64_t count = std::min((b + 1) * g.n - p, kBlock);
      ComputeTaps<T, kPad, kAlign, true>(grid + 2 * p, count, g.h, g.w, t);
      const T* gr = cot + p * c;
      if (kC > 0) {
        // Eq. (7), taps outside the image reading 0.
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
          T gx = T(0), gy = T(0);
          for (int k = 0; k < kC; ++k) {
            const T v00 = t.m[0][i] * img[t.off[0][i] * kC + k];
            const T v01 = t.m[1][i] * img[t.off[1][i] * kC + k];
            const T v10 = t.m[2][i] * img[t.off[2][i] * kC + k];
            const T v11 = t.m[3][i] * img[t.off[3][i] * kC + k];
            const T gk = gr[i * kC + k];
            gx += gk * (t.wy0[i] * (v01 - v00) + t.wy1[i] * (v11 - v10));
            gy += gk * (t.wx0[i] * (v10 - v00) + t.wx1[i] * (v11 - v01));
          }
          gxs[i] = gx;
          gys[i] = gy;
        }
        ScatterAddTaps<T, kC>(t, gr, dimg, count);
      } else {
        for (int64_t i = 0; i < count; ++i) {
          const T m0 = t.m[0][i], m1 = t.m[1][i], m2 = t.m[2][i], m3 = t.m[3][i];
          const T wx0 = t.wx0[i], wx1 = t.wx1[i], wy0 = t.wy0[i], wy1 = t.wy1[i];
          const T* p0 = img + int64_t(t.off[0][i]) * c;
          const T* p1 = img + int64_t(t.off[1][i]) * c;
          const T* p2 = img + int64_t(t.off[2][i]) * c;
          const T* p3 = img + int64_t(t.off[3][i]) * c;
          const T* gi = gr + i * c;
          T gx = T(0), gy = T(0);
#pragma omp simd reduction(+ : gx, gy)
          for (int64_t k = 0; k < c; ++k) {
            const T v00 = m0 * p0[k], v01 = m1 * p1[k], v10 = m2 * p2[k], v11 = m3 * p3[k];
            gx += gi[k] * (wy0 * (v01 - v00) + wy1 * (v11 - v10));
            gy += gi[k] * (wx0 * (v10 - v00) + wx1 * (v11 - v01));
          }
          gxs[i] = gx;
          gys[i] = gy;
          for (int q = 0; q < 4; ++q) {
            T* d = dimg + int64_t(t.off[q][i]) * c;
            const T wq = t.w[q][i];
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) d[k] += wq * gi[k];
          }
        }
      }
      T* dg = d_grid + 2 * p;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        dg[2 * i] = gxs[i] * t.dx[i];
        dg[2 * i + 1] = gys[i] * t.dy[i];
      }
      p += count;
    }
  }
}

// ---- Threads ----
//
// A call's work is a Job: chunks of [0, total) taken from a shared counter by the caller and
// by helpers (tasks of XLA's intra-op pool). The result is ready when every chunk is done, and
// the caller waits only for chunks other threads have started, so a helper that never got a
// core costs nothing: when it runs, it finds no chunk left. The Job is reference-counted
// because a late helper may look at its counter after the caller has returned.
struct Job {
  void (*run)(const void* fn, int64_t begin, int64_t end);
  const void* fn;  // the caller's callable: only touched inside a chunk, which the caller awaits
  int64_t total, step, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::atomic<int32_t> refs{1};

  void Work() {
    for (int64_t i = next.fetch_add(1); i < chunks; i = next.fetch_add(1)) {
      run(fn, std::min(total, i * step), std::min(total, (i + 1) * step));
      finished.fetch_add(1, std::memory_order_release);
    }
  }
  void Acquire() { refs.fetch_add(1, std::memory_order_relaxed); }
  void Release() {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }
};

// A helper that has run out of chunks lingers: it spins for up to STN_JAX_NATIVE_LINGER_US
// microseconds (default 100; 0 turns it off) waiting for the next call's job, which the caller
// then posts here instead of scheduling a pool task: a scheduled pool task can start late on
// every call of a burst, a lingering helper starts at once (docs/performance.md has the
// timestamps). At most one helper lingers, so at most one pool thread spins, for at most that
// long after a call.
std::atomic<Job*> g_posted{nullptr};  // a job posted for the lingering helper
// When the lingering helper stops waiting (steady-clock ns; 0 or past: nobody lingers). A
// deadline rather than a flag, so that nothing depends on the helper clearing it: in a forked
// child, whose helper thread does not exist, it simply passes.
std::atomic<int64_t> g_linger_until{0};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t LingerNs() {
  static const int64_t ns = [] {
    const char* text = std::getenv("STN_JAX_NATIVE_LINGER_US");
    const long long us = text ? std::atoll(text) : 100;
    return int64_t(std::max<long long>(0, us)) * 1000;
  }();
  return ns;
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

void Linger() {
  const int64_t limit_ns = LingerNs();
  if (limit_ns <= 0) return;
  for (;;) {  // after each job taken, linger again
    const int64_t now = NowNs();
    int64_t until = g_linger_until.load(std::memory_order_acquire);
    if (until > now) return;  // another helper lingers
    const int64_t mine = now + limit_ns;
    if (!g_linger_until.compare_exchange_strong(until, mine, std::memory_order_acq_rel)) return;
    Job* job = nullptr;
    for (int spins = 0;; ++spins) {
      if (g_posted.load(std::memory_order_relaxed) != nullptr &&
          (job = g_posted.exchange(nullptr, std::memory_order_acq_rel)) != nullptr) {
        break;
      }
      if ((spins & 63) == 0 && NowNs() > mine) break;
      CpuRelax();
    }
    int64_t expected = mine;  // stop lingering, unless another helper has begun since
    g_linger_until.compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
    // A job posted just as the time ran out is taken too (else its caller does it alone).
    if (job == nullptr) job = g_posted.exchange(nullptr, std::memory_order_acq_rel);
    if (job == nullptr) return;
    job->Work();
    job->Release();
  }
}

// Runs fn(begin, end) over [0, total) split into chunks of at least min_chunk, on the caller
// and up to num_threads - 1 helpers, and returns when every chunk is done, with a future that
// is then already complete (returning a pending future cost XLA more in thread hand-offs).
// Waking every pool thread instead of one did not pay (docs/performance.md, Threads).
template <typename F>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t min_chunk, F fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(16 * threads, total / std::max<int64_t>(1, min_chunk)));
  ffi::Promise promise;
  ffi::Future future(promise);
  const int64_t tasks = std::min(threads, chunks);
  if (tasks <= 1) {
    fn(0, total);
    promise.SetAvailable();
    return future;
  }
  Job* job = new Job;
  job->run = [](const void* f, int64_t begin, int64_t end) {
    (*static_cast<const F*>(f))(begin, end);
  };
  job->fn = &fn;
  job->total = total;
  job->chunks = chunks;
  job->step = (total + chunks - 1) / chunks;
  int64_t helpers = tasks - 1;
  if (g_linger_until.load(std::memory_order_acquire) > NowNs()) {
    job->Acquire();  // the post's reference, passed to the helper that takes it
    Job* empty = nullptr;
    if (g_posted.compare_exchange_strong(empty, job, std::memory_order_acq_rel)) {
      --helpers;
    } else {
      job->Release();
    }
  }
  for (int64_t i = 0; i < helpers; ++i) {
    job->Acquire();
    pool.Schedule([job] {
      job->Work();
      job->Release();
      Linger();
    });
  }
  job->Work();  // the caller's own share runs inline
  Job* posted = job;
  if (g_posted.compare_exchange_strong(posted, nullptr, std::memory_order_acq_rel)) {
    job->Release();  // nobody took the post
  }
  for (int spins = 0; job->finished.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
  job->Release();
  promise.SetAvailable();
  return future;
}

Geometry GetGeometry(ffi::AnyBuffer image, ffi::AnyBuffer grid) {
  auto di = image.dimensions();
  auto dg = grid.dimensions();
  const size_t ri = di.size(), rg = dg.size();
  Geometry g;
  g.h = di[ri - 3];
  g.w = di[ri - 2];
  g.c = di[ri - 1];
  g.batch = 1;
  for (size_t i = 0; i + 3 < ri; ++i) g.batch *= di[i];
  int64_t points = 1;
  for (size_t i = 0; i + 1 < rg; ++i) points *= dg[i];
  g.n = g.batch > 0 ? points / g.batch : 0;
  return g;
}

template <typename T, int32_t kPad, bool kAlign>
ffi::Future Forward(ffi::ThreadPool pool, const T* image, const T* grid, T* out, Geometry g) {
  const int64_t total = g.batch * g.n;
  // Small channel counts are compiled separately so their point loops vectorise.
  return ParallelFor(pool, total, 4096, [=](int64_t begin, int64_t end) {
    switch (g.c) {
      case 1: return ForwardRange<T, kPad, kAlign, 1>(image, grid, out, g, begin, end);
      case 3: return ForwardRange<T, kPad, kAlign, 3>(image, grid, out, g, begin, end);
      default: return ForwardRange<T, kPad, kAlign, 0>(image, grid, out, g, begin, end);
    }
  });
}

template <typename T, int32_t kPad, bool kAlign>
ffi::Future Backward(ffi::ThreadPool pool, const T* image, const T* grid, const T* cot,
                     T* d_image, T* d_grid, Geometry g) {
  const int64_t work_per_image = std::max<int64_t>(1, g.n * g.c + g.h * g.w * g.c);
  const int64_t min_images = std::max<int64_t>(1, 16384 / work_per_image);
  return ParallelFor(pool, g.batch, min_images, [=](int64_t begin, int64_t end) {
    switch (g.c) {
      case 1:
        return BackwardRange<T, kPad, kAlign, 1>(image, grid, cot, d_image, d_grid, g, begin, end);
      case 3:
        return BackwardRange<T, kPad, kAlign, 3>(image, grid, cot, d_image, d_grid, g, begin, end);
      default:
        return BackwardRange<T, kPad, kAlign, 0>(image, grid, cot, d_image, d_grid, g, begin, end);
    }
  });
}

template <typename T, template <typename, int32_t, bool> class Fn, typename... Args>
ffi::Future Dispatch(int32_t padding, bool align, Args... args) {
  if (padding == kZeros) {
    return align ? Fn<T, kZeros, true>::Run(args...) : Fn<T, kZeros, false>::Run(args...);
  }
  if (padding == kBorder) {
    return align ? Fn<T, kBorder, true>::Run(args...) : Fn<T, kBorder, false>::Run(args...);
  }
  return align ? Fn<T, kReflection, true>::Run(args...)
               : Fn<T, kReflection, false>::Run(args...);
}

template <typename T, int32_t kPad, bool kAlign>
struct ForwardFn {
  static ffi::Future Run(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                         ffi::Result<ffi::AnyBuffer> out) {
    return Forward<T, kPad, kAlign>(pool, image.typed_data<T>(), grid.typed_data<T>(),
                                    out->typed_data<T>(), GetGeometry(image, grid));
  }
};

template <typename T, int32_t kPad, bool kAlign>
struct BackwardFn {
  static ffi::Future Run(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                         ffi::AnyBuffer cot, ffi::Result<ffi::AnyBuffer> d_image,
                         ffi::Result<ffi::AnyBuffer> d_grid) {
    return Backward<T, kPad, kAlign>(pool, image.typed_data<T>(), grid.typed_data<T>(),
                                     cot.typed_data<T>(), d_image->typed_data<T>(),
                                     d_grid->typed_data<T>(), GetGeometry(image, grid));
  }
};

ffi::Future Failed(const char* message) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error(ffi::ErrorCode::kInvalidArgument, message));
  return future;
}

bool Supported(ffi::AnyBuffer image, ffi::AnyBuffer grid) {
  return image.element_type() == grid.element_type() && image.dimensions().size() >= 3 &&
         grid.dimensions().size() >= 2 &&
         (image.element_type() == ffi::DataType::F32 ||
          image.element_type() == ffi::DataType::F64);
}

ffi::Future BilinearForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                                ffi::Result<ffi::AnyBuffer> out, int32_t padding,
                                bool align_corners) {
  if (!Supported(image, grid)) return Failed("stn_bilinear_forward: unsupported operands");
  if (image.element_type() == ffi::DataType::F64) {
    return Dispatch<double, ForwardFn>(padding, align_corners, pool, image, grid, out);
  }
  return Dispatch<float, ForwardFn>(padding, align_corners, pool, image, grid, out);
}

ffi::Future BilinearBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer image, ffi::AnyBuffer grid,
                                 ffi::AnyBuffer cot, ffi::Result<ffi::AnyBuffer> d_image,
                                 ffi::Result<ffi::AnyBuffer> d_grid, int32_t padding,
                                 bool align_corners) {
  if (!Supported(image, grid)) return Failed("stn_bilinear_backward: unsupported operands");
  if (image.element_type() == ffi::DataType::F64) {
    return Dispatch<double, BackwardFn>(padding, align_corners, pool, image, grid, cot, d_image,
                                        d_grid);
  }
  return Dispatch<float, BackwardFn>(padding, align_corners, pool, image, grid, cot, d_image,
                                     d_grid);
}

}  // namespace

// The library is built with -fvisibility=hidden; only the two handlers are exported.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearForward, BilinearForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("padding")
                                  .Attr<bool>("align_corners"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearBackward, BilinearBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("padding")
                                  .Attr<bool>("align_corners"));

#pragma GCC visibility pop
