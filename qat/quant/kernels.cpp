// Fused CPU loops of the fake quant (qat/quant/kernels.py builds this file on first use).
//
// Each loop computes, value by value, the same float32 operations in the same order as the chain of
// PyTorch ops it replaces (qat/quant/ste.py, qat/quant/observers.py), so results are equal bit for bit;
// it is compiled without fast-math and without contraction into fused multiply-adds. Tensors arrive as
// contiguous float32 rows (R x C) with one scale and zero point per row, or one for all rows (stride 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// ste.affine_parts: q = clamp(round(x * (1/s)) + z, lo, hi) (round half to even), the mask of values
// moved by the clamp (NaN included), the codes, and y = (q - z) * s + 0 * x (NaN for a non-finite x).
template <typename code_t>
void affine_rows_loop(const float* x, const float* s, const float* z, int64_t ss, int64_t zs, int64_t rows,
                      int64_t cols, float lo, float hi, float* y, bool* mask, code_t* codes) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float sc = s[r * ss], zp = z[r * zs], inv = 1.0f / sc;
      const float* xr = x + r * cols;
      float* yr = y + r * cols;
      bool* mr = mask + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const float v = xr[c];
        const float q = std::nearbyint(v * inv) + zp;
        const float cl = q < lo ? lo : (q > hi ? hi : q);
        mr[c] = (q - cl) != 0.0f;
        yr[c] = (cl - zp) * sc + v * 0.0f;
      }
      if (codes != nullptr) {
        code_t* cr = codes + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          const float q = std::nearbyint(xr[c] * inv) + zp;
          cr[c] = static_cast<code_t>(q < lo ? lo : (q > hi ? hi : q));
        }
      }
    }
  });
}

// ste.affine_dequant: (float(code) - z) * s.
template <typename code_t>
void dequant_rows_loop(const code_t* codes, const float* s, const float* z, int64_t ss, int64_t zs,
                       int64_t rows, int64_t cols, float* y) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float sc = s[r * ss], zp = z[r * zs];
      const code_t* cr = codes + r * cols;
      float* yr = y + r * cols;
      for (int64_t c = 0; c < cols; ++c) yr[c] = (static_cast<float>(cr[c]) - zp) * sc;
    }
  });
}

// ste._stopped: the gradient where the clip mask is 0, else +0 (all bits cleared: integer ops vectorize).
void stopped_loop(const float* g, const bool* mask, int64_t n, float* out) {
  const uint32_t* gi = reinterpret_cast<const uint32_t*>(g);
  const uint8_t* mi = reinterpret_cast<const uint8_t*>(mask);
  uint32_t* oi = reinterpret_cast<uint32_t*>(out);
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) oi[i] = gi[i] & (static_cast<uint32_t>(mi[i]) - 1u);
  });
}

constexpr int kLanes = 16;  // independent running min/max per lane, so that the compiler vectorizes

// observers.finite_range: per row, min and max of the values with inf/NaN counted as 0.
void finite_range_loop(const float* x, int64_t rows, int64_t cols, float* lo, float* hi) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * cols;
      float mn[kLanes], mx[kLanes];
      for (int l = 0; l < kLanes; ++l) mn[l] = INFINITY, mx[l] = -INFINITY;
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float v = xr[c + l];
          const float f = (v - v) == 0.0f ? v : 0.0f;  // v - v is 0 for finite v, NaN otherwise
          mn[l] = f < mn[l] ? f : mn[l];
          mx[l] = f > mx[l] ? f : mx[l];
        }
      }
      for (; c < cols; ++c) {
        const float v = xr[c];
        const float f = (v - v) == 0.0f ? v : 0.0f;
        mn[0] = f < mn[0] ? f : mn[0];
        mx[0] = f > mx[0] ? f : mx[0];
      }
      float a = mn[0], b = mx[0];
      for (int l = 1; l < kLanes; ++l) a = mn[l] < a ? mn[l] : a, b = mx[l] > b ? mx[l] : b;
      lo[r] = a;
      hi[r] = b;
    }
  });
}

int64_t stride_of(const torch::Tensor& p) { return p.numel() == 1 ? 0 : 1; }

}  // namespace

std::vector<torch::Tensor> affine_rows(torch::Tensor x, torch::Tensor s, torch::Tensor z, double lo, double hi,
                                       int64_t code_kind) {
  const int64_t rows = x.size(0), cols = x.size(1);
  auto y = torch::empty_like(x);
  auto mask = torch::empty({rows, cols}, x.options().dtype(torch::kBool));
  const float *xp = x.data_ptr<float>(), *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  const int64_t ss = stride_of(s), zs = stride_of(z);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  if (code_kind == 1) {
    auto codes = torch::empty({rows, cols}, x.options().dtype(torch::kInt8));
    affine_rows_loop<int8_t>(xp, sp, zp, ss, zs, rows, cols, flo, fhi, y.data_ptr<float>(),
                             mask.data_ptr<bool>(), codes.data_ptr<int8_t>());
    return {y, mask, codes};
  }
  if (code_kind == 2) {
    auto codes = torch::empty({rows, cols}, x.options().dtype(torch::kUInt8));
    affine_rows_loop<uint8_t>(xp, sp, zp, ss, zs, rows, cols, flo, fhi, y.data_ptr<float>(),
                              mask.data_ptr<bool>(), codes.data_ptr<uint8_t>());
    return {y, mask, codes};
  }
  affine_rows_loop<int8_t>(xp, sp, zp, ss, zs, rows, cols, flo, fhi, y.data_ptr<float>(), mask.data_ptr<bool>(),
                           nullptr);
  return {y, mask};
}

torch::Tensor dequant_rows(torch::Tensor codes, torch::Tensor s, torch::Tensor z) {
  const int64_t rows = codes.size(0), cols = codes.size(1);
  auto y = torch::empty({rows, cols}, codes.options().dtype(torch::kFloat));
  const float *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  if (codes.scalar_type() == torch::kInt8) {
    dequant_rows_loop<int8_t>(codes.data_ptr<int8_t>(), sp, zp, stride_of(s), stride_of(z), rows, cols,
                              y.data_ptr<float>());
  } else {
    dequant_rows_loop<uint8_t>(codes.data_ptr<uint8_t>(), sp, zp, stride_of(s), stride_of(z), rows, cols,
                               y.data_ptr<float>());
  }
  return y;
}

torch::Tensor stopped(torch::Tensor g, torch::Tensor mask) {
  auto out = torch::empty_like(g);
  stopped_loop(g.data_ptr<float>(), mask.data_ptr<bool>(), g.numel(), out.data_ptr<float>());
  return out;
}

std::vector<torch::Tensor> finite_range(torch::Tensor x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  auto lo = torch::empty({rows}, x.options()), hi = torch::empty({rows}, x.options());
  finite_range_loop(x.data_ptr<float>(), rows, cols, lo.data_ptr<float>(), hi.data_ptr<float>());
  return {lo, hi};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_rows", &affine_rows, "ste.affine_parts on float32 rows: value, clip mask, codes");
  m.def("dequant_rows", &dequant_rows, "ste.affine_dequant of int8/uint8 rows to float32");
  m.def("stopped", &stopped, "the gradient where the clip mask is false, else 0");
  m.def("finite_range", &finite_range, "per-row min and max, inf/NaN counted as 0");
}
