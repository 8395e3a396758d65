/* A do-nothing CUDA driver for bench/host.py: every entry point that triton's CUDA driver
 * (triton/backends/nvidia/driver.c) and its C launcher call returns CUDA_SUCCESS, does no work
 * and fills its outputs with the values of one H200 (sm_90, 132 SMs, 227 KiB of shared memory
 * per block). Kernel launches are accepted and dropped, so the host-side launch path (the
 * binder, the compile cache, the C launcher's argument extraction) runs for real on CPU
 * tensors, whose data_ptr() is passed through as the "device pointer".
 *
 * Built by bench/host.py with `gcc -shared -fPIC -I<triton's cuda.h> -o libcuda.so.1`; the
 * prototypes come from triton's own cuda.h, so the ABI is the one triton was built against.
 */
#include <string.h>

#include "cuda.h"

#define OK return CUDA_SUCCESS

static int context_token, module_token, function_token;

CUresult CUDAAPI cuInit(unsigned int flags) { OK; }
CUresult CUDAAPI cuDriverGetVersion(int *version) { *version = 12080; OK; }
CUresult CUDAAPI cuDeviceGetCount(int *count) { *count = 1; OK; }
CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; OK; }

CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice device) {
  strncpy(name, "do-nothing H200 (bench/host_libcuda.c)", (size_t)len);
  if (len > 0) name[len - 1] = 0;
  OK;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 227 * 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 228 * 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = 48 * 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *value = 1980000; break;         /* kHz */
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *value = 2619000; break;  /* kHz */
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *value = 6144; break;
    default: *value = 1;
  }
  OK;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
  *ctx = (CUcontext)&context_token;
  OK;
}
CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice device) { OK; }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *ctx) { *ctx = (CUcontext)&context_token; OK; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) { OK; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *device) { *device = 0; OK; }
CUresult CUDAAPI cuCtxGetLimit(size_t *value, CUlimit limit) { *value = 1 << 20; OK; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) { OK; }

CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  *module = (CUmodule)&module_token;
  OK;
}
CUresult CUDAAPI cuModuleUnload(CUmodule module) { OK; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  *function = (CUfunction)&function_token;
  OK;
}

CUresult CUDAAPI cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction function) {
  switch (attribute) {
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *value = 128; break;
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
    default: *value = 0;  /* no local memory (spills), no static shared memory */
  }
  OK;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) { OK; }
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction function, CUfunc_cache config) { OK; }

CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *clusters, CUfunction function, const CUlaunchConfig *config) {
  *clusters = 1;
  OK;
}

/* Every pointer is its own device pointer (CPU tensors' data_ptr()). */
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr pointer) {
  if (attribute == CU_POINTER_ATTRIBUTE_DEVICE_POINTER) *(CUdeviceptr *)data = pointer;
  else *(int *)data = 0;
  OK;
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes, void **data,
                                        CUdeviceptr pointer) {
  for (unsigned int i = 0; i < n; ++i) cuPointerGetAttribute(data[i], attributes[i], pointer);
  OK;
}

CUresult CUDAAPI cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  OK;
}

/* The launch itself: accepted and dropped. */
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction function, void **params, void **extra) {
  OK;
}
CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                unsigned int by, unsigned int bz, unsigned int shared, CUstream stream, void **params,
                                void **extra) {
  OK;
}

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                        const cuuint64_t *dims, const cuuint64_t *strides, const cuuint32_t *box,
                                        const cuuint32_t *element_strides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion,
                                        CUtensorMapFloatOOBfill fill) {
  memset(map, 0, sizeof(*map));
  OK;
}
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                         const cuuint64_t *dims, const cuuint64_t *strides, const int *lower,
                                         const int *upper, cuuint32_t channels, cuuint32_t pixels,
                                         const cuuint32_t *element_strides, CUtensorMapInterleave interleave,
                                         CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion,
                                         CUtensorMapFloatOOBfill fill) {
  memset(map, 0, sizeof(*map));
  OK;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **text) {
  *text = "error from the do-nothing driver (bench/host_libcuda.c)";
  OK;
}
CUresult CUDAAPI cuGetErrorName(CUresult error, const char **text) {
  *text = "CUDA_ERROR_STUB";
  OK;
}
