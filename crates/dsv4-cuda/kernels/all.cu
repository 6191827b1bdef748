// The single translation unit nvcc compiles into the embedded fatbin.
#include "linear.cu"
#include "elementwise.cu"
#include "attention.cu"
#include "moe.cu"
#include "gemm.cu"
#include "gemm_tc.cu"
#include "quant.cu"
#include "gemv_bulk.cu"
