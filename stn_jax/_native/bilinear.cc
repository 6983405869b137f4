// Native CPU kernels of stn_jax.bilinear_sample (forward and backward) for the XLA FFI.
//
// The semantics are exactly those of the pure-JAX reference in stn_jax/sampling.py (torch
// grid_sample conventions): the same coordinate formulas in the same order of operations (the
// file is compiled with -ffp-contract=off so that no FMA changes a rounding), the same
// padding modes, the same treatment of non-finite and huge grid values and the same one-sided
// (floor) derivative at integer coordinates. The reference is what the tests compare against.
//
// Layout: image (..., H, W, C), grid (..., N, 2), output (..., N, C); the leading dimensions
// (the batch, and any vmapped axes) have the same product in every operand.
//
// Work is split over the XLA intra-op thread pool: the forward over chunks of output points,
// the backward over chunks of whole images (each image's gradient is owned by one task, so the
// scatter-add needs no atomics and the result is deterministic). The handlers are asynchronous:
// they return a future that completes when the last chunk is done, so no pool thread blocks.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Padding : int32_t { kZeros = 0, kBorder = 1, kReflection = 2 };

constexpr double kMaxAbsGrid = 1e6;  // must equal sampling._MAX_ABS_GRID

// Where-based clamp with a zero derivative at and beyond the limits.
template <typename T>
inline void Clamp(T& x, T& deriv, T lo, T hi) {
  const bool inside = (x > lo) & (x < hi);
  x = x <= lo ? lo : (x >= hi ? hi : x);
  deriv = inside ? deriv : T(0);
}

// torch's reflect_coordinates, as sampling._reflect.
template <typename T>
inline void Reflect(T& x, T& deriv, int64_t twice_low, int64_t twice_high) {
  if (twice_low == twice_high) {
    x = T(0);
    deriv = T(0);
    return;
  }
  const T low = T(double(twice_low) / 2);
  const T span = T(double(twice_high - twice_low) / 2);
  x = x - low;
  const T sign = x < T(0) ? T(-1) : T(1);
  x = std::fabs(x);
  const T extra = std::fmod(x, span);
  const T flips = std::floor(x / span);
  const bool odd = std::fmod(flips, T(2)) == T(1);
  x = odd ? span - extra + low : extra + low;
  deriv = deriv * (odd ? -sign : sign);
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
inline void SourceCoord(T g, int64_t size, T& x, T& deriv) {
  if (kAlign) {
    x = (g + T(1)) / T(2) * T(size - 1);
    deriv = T(double(size - 1) / 2);
  } else {
    x = ((g + T(1)) * T(size) - T(1)) / T(2);
    deriv = T(double(size) / 2);
  }
  x = SnapToIntegers(x, size);
  if (kPad == kZeros) {
    Clamp(x, deriv, T(-2), T(size + 1));
    return;
  }
  if (kPad == kReflection) {
    if (kAlign) {
      Reflect(x, deriv, 0, 2 * (size - 1));
    } else {
      Reflect(x, deriv, -1, 2 * size - 1);
    }
  }
  Clamp(x, deriv, T(0), T(size - 1));
}

// The 4 taps of one point: flat pixel offsets (clamped into the image) and bilinear weights
// (0 for taps outside the image or a non-finite point), plus what the grid gradient needs.
template <typename T>
struct Taps {
  int64_t off[4];  // y0x0, y0x1, y1x0, y1x1, in pixels
  T w[4];
  T wx0, wx1, wy0, wy1;
  bool valid[4];
  T dx, dy;
};

template <typename T, int32_t kPad, bool kAlign>
inline void ComputeTaps(T gx, T gy, int64_t h, int64_t w, Taps<T>& t) {
  const bool finite = std::isfinite(gx) & std::isfinite(gy);
  if (!finite) {
    gx = T(0);
    gy = T(0);
  }
  T dcx = T(1), dcy = T(1);
  Clamp(gx, dcx, T(-kMaxAbsGrid), T(kMaxAbsGrid));
  Clamp(gy, dcy, T(-kMaxAbsGrid), T(kMaxAbsGrid));
  T x, y, dx, dy;
  SourceCoord<T, kPad, kAlign>(gx, w, x, dx);
  SourceCoord<T, kPad, kAlign>(gy, h, y, dy);
  t.dx = finite ? dx * dcx : T(0);
  t.dy = finite ? dy * dcy : T(0);

  const T x0f = std::floor(x);
  const T y0f = std::floor(y);
  const T wx1 = x - x0f;
  const T wy1 = y - y0f;
  const int64_t ix0 = int64_t(int32_t(x0f)), iy0 = int64_t(int32_t(y0f));
  const int64_t ix1 = ix0 + 1, iy1 = iy0 + 1;
  const bool vx0 = (ix0 >= 0) & (ix0 < w), vx1 = (ix1 >= 0) & (ix1 < w);
  const bool vy0 = ((iy0 >= 0) & (iy0 < h)) & finite, vy1 = ((iy1 >= 0) & (iy1 < h)) & finite;
  const int64_t cx0 = std::clamp<int64_t>(ix0, 0, w - 1), cx1 = std::clamp<int64_t>(ix1, 0, w - 1);
  const int64_t cy0 = std::clamp<int64_t>(iy0, 0, h - 1), cy1 = std::clamp<int64_t>(iy1, 0, h - 1);
  t.wx0 = T(1) - wx1;
  t.wx1 = wx1;
  t.wy0 = T(1) - wy1;
  t.wy1 = wy1;
  t.off[0] = cy0 * w + cx0;
  t.off[1] = cy0 * w + cx1;
  t.off[2] = cy1 * w + cx0;
  t.off[3] = cy1 * w + cx1;
  t.valid[0] = vy0 & vx0;
  t.valid[1] = vy0 & vx1;
  t.valid[2] = vy1 & vx0;
  t.valid[3] = vy1 & vx1;
  t.w[0] = t.valid[0] ? t.wy0 * t.wx0 : T(0);
  t.w[1] = t.valid[1] ? t.wy0 * t.wx1 : T(0);
  t.w[2] = t.valid[2] ? t.wy1 * t.wx0 : T(0);
  t.w[3] = t.valid[3] ? t.wy1 * t.wx1 : T(0);
}

struct Geometry {
  int64_t batch, h, w, c, n;
};

// Points [begin, end) of the flattened (batch * n) output.
template <typename T, int32_t kPad, bool kAlign>
void ForwardRange(const T* image, const T* grid, T* out, const Geometry& g, int64_t begin,
                  int64_t end) {
  const int64_t pixels = g.h * g.w;
  Taps<T> t;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = p / g.n;
    const T* img = image + b * pixels * g.c;
    ComputeTaps<T, kPad, kAlign>(grid[2 * p], grid[2 * p + 1], g.h, g.w, t);
    T* o = out + p * g.c;
    if (g.c == 1) {
      o[0] = t.w[0] * img[t.off[0]] + t.w[1] * img[t.off[1]] + t.w[2] * img[t.off[2]] +
             t.w[3] * img[t.off[3]];
      continue;
    }
    const T* v0 = img + t.off[0] * g.c;
    const T* v1 = img + t.off[1] * g.c;
    const T* v2 = img + t.off[2] * g.c;
    const T* v3 = img + t.off[3] * g.c;
    for (int64_t k = 0; k < g.c; ++k) {
      o[k] = t.w[0] * v0[k] + t.w[1] * v1[k] + t.w[2] * v2[k] + t.w[3] * v3[k];
    }
  }
}

// Images [begin, end): d_image for those images (zeroed here) and d_grid for their points.
template <typename T, int32_t kPad, bool kAlign>
void BackwardRange(const T* image, const T* grid, const T* cot, T* d_image, T* d_grid,
                   const Geometry& g, int64_t begin, int64_t end) {
  const int64_t pixels = g.h * g.w;
  Taps<T> t;
  for (int64_t b = begin; b < end; ++b) {
    const T* img = image + b * pixels * g.c;
    T* dimg = d_image + b * pixels * g.c;
    std::memset(dimg, 0, sizeof(T) * pixels * g.c);
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t p = b * g.n + i;
      ComputeTaps<T, kPad, kAlign>(grid[2 * p], grid[2 * p + 1], g.h, g.w, t);
      const T* gr = cot + p * g.c;
      // Taps outside the image read 0 for the grid gradient, eq. (7).
      const T m0 = t.valid[0] ? T(1) : T(0), m1 = t.valid[1] ? T(1) : T(0);
      const T m2 = t.valid[2] ? T(1) : T(0), m3 = t.valid[3] ? T(1) : T(0);
      T gx = T(0), gy = T(0);
      if (g.c == 1) {
        const T v00 = m0 * img[t.off[0]], v01 = m1 * img[t.off[1]];
        const T v10 = m2 * img[t.off[2]], v11 = m3 * img[t.off[3]];
        const T c = gr[0];
        gx = c * (t.wy0 * (v01 - v00) + t.wy1 * (v11 - v10));
        gy = c * (t.wx0 * (v10 - v00) + t.wx1 * (v11 - v01));
        dimg[t.off[0]] += t.w[0] * c;
        dimg[t.off[1]] += t.w[1] * c;
        dimg[t.off[2]] += t.w[2] * c;
        dimg[t.off[3]] += t.w[3] * c;
      } else {
        const T* p0 = img + t.off[0] * g.c;
        const T* p1 = img + t.off[1] * g.c;
        const T* p2 = img + t.off[2] * g.c;
        const T* p3 = img + t.off[3] * g.c;
        for (int64_t k = 0; k < g.c; ++k) {
          const T v00 = m0 * p0[k], v01 = m1 * p1[k], v10 = m2 * p2[k], v11 = m3 * p3[k];
          gx += gr[k] * (t.wy0 * (v01 - v00) + t.wy1 * (v11 - v10));
          gy += gr[k] * (t.wx0 * (v10 - v00) + t.wx1 * (v11 - v01));
        }
        T* q0 = dimg + t.off[0] * g.c;
        T* q1 = dimg + t.off[1] * g.c;
        T* q2 = dimg + t.off[2] * g.c;
        T* q3 = dimg + t.off[3] * g.c;
        for (int64_t k = 0; k < g.c; ++k) q0[k] += t.w[0] * gr[k];
        for (int64_t k = 0; k < g.c; ++k) q1[k] += t.w[1] * gr[k];
        for (int64_t k = 0; k < g.c; ++k) q2[k] += t.w[2] * gr[k];
        for (int64_t k = 0; k < g.c; ++k) q3[k] += t.w[3] * gr[k];
      }
      d_grid[2 * p] = gx * t.dx;
      d_grid[2 * p + 1] = gy * t.dy;
    }
  }
}

// Runs fn(begin, end) over [0, total) in about `tasks` chunks on the pool; returns a future.
template <typename F>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t min_chunk, F fn) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(threads, std::max<int64_t>(1, total / min_chunk));
  ffi::CountDownPromise done(chunks);
  ffi::Future future(done);
  const int64_t step = (total + chunks - 1) / chunks;
  for (int64_t i = 1; i < chunks; ++i) {
    const int64_t begin = std::min(total, i * step), end = std::min(total, (i + 1) * step);
    pool.Schedule([fn, begin, end, done]() mutable {
      fn(begin, end);
      done.CountDown();
    });
  }
  // The caller's own share runs inline.
  fn(0, std::min(total, step));
  done.CountDown();
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
  g.n = dg[rg - 2];
  g.batch = 1;
  for (size_t i = 0; i + 3 < ri; ++i) g.batch *= di[i];
  return g;
}

template <typename T, int32_t kPad, bool kAlign>
ffi::Future Forward(ffi::ThreadPool pool, const T* image, const T* grid, T* out, Geometry g) {
  const int64_t total = g.batch * g.n;
  return ParallelFor(pool, total, 4096, [=](int64_t begin, int64_t end) {
    ForwardRange<T, kPad, kAlign>(image, grid, out, g, begin, end);
  });
}

template <typename T, int32_t kPad, bool kAlign>
ffi::Future Backward(ffi::ThreadPool pool, const T* image, const T* grid, const T* cot,
                     T* d_image, T* d_grid, Geometry g) {
  const int64_t work_per_image = std::max<int64_t>(1, g.n * g.c + g.h * g.w * g.c);
  const int64_t min_images = std::max<int64_t>(1, 16384 / work_per_image);
  return ParallelFor(pool, g.batch, min_images, [=](int64_t begin, int64_t end) {
    BackwardRange<T, kPad, kAlign>(image, grid, cot, d_image, d_grid, g, begin, end);
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
