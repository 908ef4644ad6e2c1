#include "dct_matrix.h"

#include "pyboundary_math.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <map>
#include <mutex>
#include <tuple>

namespace pyboundary {

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
  TORCH_CHECK(n >= 1, "dct_matrix_cached: n must be >= 1, got ", n, " (internal error: ops check "
              "for empty inputs before asking for matrices)");
  const CacheKey key{n, static_cast<int>(dtype), static_cast<int>(device.type()),
                     static_cast<int>(device.index()), transposed};
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = cache().find(key);
    if (it != cache().end()) return it->second;
  }
  at::Tensor m = build(n, dtype, device, transposed);
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  if (cache().size() >= kMaxCacheEntries) cache().clear();
  return cache().emplace(key, m).first->second;
}

}  // namespace pyboundary
