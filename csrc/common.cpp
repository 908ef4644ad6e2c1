#include "common.h"

#include "pyboundary_math.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <map>
#include <mutex>
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

void check_origins(const char* op, int64_t n, const at::Tensor& row0, const at::Tensor& col0,
                   const c10::Device& device, int64_t kh, int64_t kw, int64_t H, int64_t W) {
  struct Axis {
    const char* name;
    const at::Tensor& t;
    const char* kname;
    int64_t k;
    int64_t size;
  };
  const Axis axes[2] = {{"row0", row0, "kh", kh, H}, {"col0", col0, "kw", kw, W}};
  for (const Axis& a : axes) {
    TORCH_CHECK_TYPE(a.t.defined(), op, ": ", a.name, " must be a defined tensor");
    TORCH_CHECK_TYPE(a.t.scalar_type() == at::kLong, op, ": ", a.name, " must be int64, got ",
                     dtype_name(a.t.scalar_type()));
    TORCH_CHECK_VALUE(a.t.dim() == 1 && a.t.size(0) == n, op, ": ", a.name, " must have shape (",
                      n, ",) (one origin per sample), got ", a.t.sizes());
    TORCH_CHECK_VALUE(a.t.device() == device, op, ": ", a.name, " is on ", a.t.device(),
                      " but the data is on ", device);
    TORCH_CHECK_VALUE(a.k >= 1 && a.k <= a.size, op, ": block size ", a.kname, "=", a.k,
                      " must be in [1, ", a.size, "]");
    if (n == 0) continue;
    const at::Tensor host = a.t.is_cpu() ? a.t.contiguous() : a.t.to(at::kCPU).contiguous();
    const int64_t* v = host.const_data_ptr<int64_t>();
    int64_t lo = v[0], hi = v[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = v[i] < lo ? v[i] : lo;
      hi = v[i] > hi ? v[i] : hi;
    }
    TORCH_CHECK_VALUE(lo >= 0 && hi + a.k <= a.size, op, ": ", a.name, " values must lie in [0, ",
                      a.size - a.k, "] for a block of ", a.k, " in a dimension of ", a.size,
                      "; got range [", lo, ", ", hi, "]");
  }
}

void check_analysis_args(const at::Tensor& x, const at::Tensor& row0, const at::Tensor& col0,
                         int64_t kh, int64_t kw) {
  const char* op = "dct_block_analysis";
  check_float(op, "x", x);
  check_rank(op, "x", x, 4, "(N, C, H, W)", false);
  check_origins(op, x.size(0), row0, col0, x.device(), kh, kw, x.size(2), x.size(3));
}

void check_synthesis_args(const at::Tensor& coeffs, const at::Tensor& row0,
                          const at::Tensor& col0, int64_t H, int64_t W) {
  const char* op = "dct_block_synthesis";
  check_float(op, "coeffs", coeffs);
  check_rank(op, "coeffs", coeffs, 4, "(N, C, kh, kw)", false);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": H and W must be >= 1, got H=", H, ", W=", W);
  check_origins(op, coeffs.size(0), row0, col0, coeffs.device(), coeffs.size(2), coeffs.size(3),
                H, W);
}

bool check_select_args(const at::Tensor& gap, const at::Tensor& grad_gap, double p, double eps) {
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
                   dtype_name(grad_gap.scalar_type()),
                   ") dtypes differ");
  TORCH_CHECK_VALUE(gap.device() == grad_gap.device(), op, ": gap is on ", gap.device(),
                    " but grad_gap is on ", grad_gap.device());
  TORCH_CHECK_VALUE(p == 2.0 || (std::isinf(p) && p > 0), op, ": p must be 2 or inf, got ", p);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  return std::isinf(p);
}

SelectBuffers select_buffers(const at::Tensor& gap, const at::Tensor& grad_gap) {
  const int64_t N = grad_gap.size(0), M = grad_gap.size(2);
  return {gap.contiguous(), grad_gap.contiguous(), at::empty({N, M}, grad_gap.options()),
          at::empty({N}, gap.options().dtype(at::kLong)), at::empty({N}, gap.options())};
}

// ---- DCT matrix cache ----------------------------------------------------------------------

at::Tensor build_dct_matrix_cpu(int64_t n, at::ScalarType dtype, bool transposed) {
  at::Tensor m = at::empty({n, n}, at::TensorOptions().dtype(at::kDouble));
  double* d = m.mutable_data_ptr<double>();
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const double c = math::dct_coef(n, k, i);
      d[transposed ? i * n + k : k * n + i] = c;
    }
  }
  return dtype == at::kDouble ? m : m.to(dtype);
}

namespace {
using CacheKey = std::tuple<int64_t, int, int, int, bool>;  // n, dtype, device type, index, T
constexpr size_t kMaxCacheEntries = 64;
std::mutex g_cache_mutex;
std::map<CacheKey, at::Tensor>& cache() {
  static auto* c = new std::map<CacheKey, at::Tensor>();  // leaked: no destruction-order issues
  return *c;
}
}  // namespace

at::Tensor dct_matrix_cached(int64_t n, at::ScalarType dtype, c10::Device device,
                             bool transposed, const DctBuilder& build) {
  const CacheKey key{n, static_cast<int>(dtype), static_cast<int>(device.type()),
                     static_cast<int>(device.index()), transposed};
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = cache().find(key);
    if (it != cache().end()) return it->second;
  }
  // Built outside the lock; a concurrent miss builds an identical matrix, first one wins.
  at::Tensor m = build(n, dtype, device, transposed);
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  if (cache().size() >= kMaxCacheEntries) cache().clear();
  return cache().emplace(key, m).first->second;
}

at::Tensor dct2_impl(const at::Tensor& x, bool inverse, const DctBuilder& build) {
  const char* op = inverse ? "idct2" : "dct2";
  check_float(op, "x", x);
  check_rank(op, "x", x, 2, "(..., H, W)", /*at_least=*/true);
  const int64_t H = x.size(-2), W = x.size(-1);
  // forward: C_H X C_W^T;  inverse: C_H^T X C_W.
  const at::Tensor left = dct_matrix_cached(H, x.scalar_type(), x.device(), inverse, build);
  const at::Tensor right = dct_matrix_cached(W, x.scalar_type(), x.device(), !inverse, build);
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  // Columns first: one large GEMM (B*H, W) x (W, W); then the rows, batched over B.
  const at::Tensor xc = x.contiguous();
  const at::Tensor y = at::matmul(xc.view({-1, W}), right).view({-1, H, W});
  return at::matmul(left, y).view(x.sizes());
}

}  // namespace pyboundary
