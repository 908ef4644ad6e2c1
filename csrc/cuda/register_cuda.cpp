// CUDA registration of the pyboundary ops (compiled only when the CUDA kernels are built).
#include "../common.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pyboundary, CUDA, m) {
  m.impl("dct2", &pyboundary::dct2_cuda);
  m.impl("idct2", &pyboundary::idct2_cuda);
  m.impl("dct_block_analysis", &pyboundary::dct_block_analysis_cuda);
  m.impl("dct_block_synthesis", &pyboundary::dct_block_synthesis_cuda);
  m.impl("deepfool_select", &pyboundary::deepfool_select_cuda);
}
