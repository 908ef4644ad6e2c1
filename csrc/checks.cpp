#include "checks.h"

#include "pyboundary_math.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace pyboundary {

std::string dtype_name(at::ScalarType t) {
  // The Python spelling (torch.float32 ...), as in the messages of the pure-torch twins.
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", dtype_name(t.scalar_type()));
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                const char* shape, bool at_least) {
  const bool ok = at_least ? t.dim() >= dim : t.dim() == dim;
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have ", at_least ? "at least " : "", dim,
                    " dimensions ", shape, ", got shape ", t.sizes());
}

namespace {
struct OriginAxis {
  const char* name;
  const at::Tensor& t;
  const char* kname;
  int64_t k;
  int64_t size;
};
}  // namespace

void check_origin_tensors(const char* op, int64_t n, const at::Tensor& row0,
                          const at::Tensor& col0, const c10::Device& device, int64_t kh,
                          int64_t kw, int64_t H, int64_t W) {
  const OriginAxis axes[2] = {{"row0", row0, "kh", kh, H}, {"col0", col0, "kw", kw, W}};
  for (const OriginAxis& a : axes) {
    TORCH_CHECK_TYPE(a.t.defined(), op, ": ", a.name, " must be a defined tensor");
    TORCH_CHECK_TYPE(a.t.scalar_type() == at::kLong, op, ": ", a.name, " must be int64, got ",
                     dtype_name(a.t.scalar_type()));
    TORCH_CHECK_VALUE(a.t.dim() == 1 && a.t.size(0) == n, op, ": ", a.name, " must have shape (",
                      n, ",) (one origin per sample), got ", a.t.sizes());
    TORCH_CHECK_VALUE(a.t.device() == device, op, ": ", a.name, " is on ", a.t.device(),
                      " but the data is on ", device);
    TORCH_CHECK_VALUE(a.k >= 1 && a.k <= a.size, op, ": block size ", a.kname, "=", a.k,
                      " must be in [1, ", a.size, "]");
  }
}

void check_origin_values_cpu(const char* op, const at::Tensor& row0, const at::Tensor& col0,
                             int64_t kh, int64_t kw, int64_t H, int64_t W) {
  const OriginAxis axes[2] = {{"row0", row0, "kh", kh, H}, {"col0", col0, "kw", kw, W}};
  for (const OriginAxis& a : axes) {
    TORCH_CHECK(a.t.is_cpu(), op, ": check_origin_values_cpu called with ", a.t.device(),
                " origins (internal error: CUDA origins are checked in the kernels)");
    const int64_t n = a.t.numel();
    if (n == 0) continue;
    const at::Tensor host = a.t.contiguous();
    const int64_t* v = host.const_data_ptr<int64_t>();
    int64_t lo = v[0], hi = v[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = v[i] < lo ? v[i] : lo;
      hi = v[i] > hi ? v[i] : hi;
    }
    TORCH_CHECK_VALUE(math::block_origin_ok(lo, a.k, a.size) && math::block_origin_ok(hi, a.k, a.size),
                      op, ": ", a.name, " values must lie in [0, ", a.size - a.k, "] for a block of ",
                      a.k, " in a dimension of ", a.size, "; got range [", lo, ", ", hi, "]");
  }
}

void check_dct2_args(const char* op, const at::Tensor& x) {
  check_float(op, "x", x);
  check_rank(op, "x", x, 2, "(..., H, W)", /*at_least=*/true);
}

void check_analysis_args(const at::Tensor& x, const at::Tensor& row0, const at::Tensor& col0,
                         int64_t kh, int64_t kw) {
  const char* op = "dct_block_analysis";
  check_float(op, "x", x);
  check_rank(op, "x", x, 4, "(N, C, H, W)", false);
  check_origin_tensors(op, x.size(0), row0, col0, x.device(), kh, kw, x.size(2), x.size(3));
}

void check_synthesis_args(const at::Tensor& coeffs, const at::Tensor& row0,
                          const at::Tensor& col0, int64_t H, int64_t W) {
  const char* op = "dct_block_synthesis";
  check_float(op, "coeffs", coeffs);
  check_rank(op, "coeffs", coeffs, 4, "(N, C, kh, kw)", false);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": H and W must be >= 1, got H=", H, ", W=", W);
  check_origin_tensors(op, coeffs.size(0), row0, col0, coeffs.device(), coeffs.size(2),
                       coeffs.size(3), H, W);
}

SelectArgs check_select_args(const at::Tensor& gap, const at::Tensor& grad_gap, double p,
                             double eps) {
  const char* op = "deepfool_select";
  check_float(op, "gap", gap);
  check_float(op, "grad_gap", grad_gap);
  TORCH_CHECK_VALUE(gap.dim() == 2, op, ": gap must have shape (N, k), got ", gap.sizes());
  TORCH_CHECK_VALUE(grad_gap.dim() == 3, op, ": grad_gap must have shape (N, k, M), got ",
                    grad_gap.sizes());
  TORCH_CHECK_VALUE(grad_gap.size(0) == gap.size(0) && grad_gap.size(1) == gap.size(1), op,
                    ": grad_gap shape ", grad_gap.sizes(), " does not match gap shape ",
                    gap.sizes(), " in (N, k)");
  TORCH_CHECK_VALUE(gap.size(1) >= 1, op, ": need at least one candidate (k >= 1), got k=0");
  TORCH_CHECK_TYPE(gap.scalar_type() == grad_gap.scalar_type(), op, ": gap (",
                   dtype_name(gap.scalar_type()), ") and grad_gap (",
                   dtype_name(grad_gap.scalar_type()), ") dtypes differ");
  TORCH_CHECK_VALUE(gap.device() == grad_gap.device(), op, ": gap is on ", gap.device(),
                    " but grad_gap is on ", grad_gap.device());
  TORCH_CHECK_VALUE(p == 2.0 || (std::isinf(p) && p > 0), op, ": p must be 2 or inf, got ", p);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t N = grad_gap.size(0), M = grad_gap.size(2);
  return {std::isinf(p),
          gap.contiguous(),
          grad_gap.contiguous(),
          at::empty({N, M}, grad_gap.options()),
          at::empty({N}, gap.options().dtype(at::kLong)),
          at::empty({N}, gap.options())};
}

}  // namespace pyboundary
