/* liblowbit: runs a lowbit packed model (format version 2: safetensors + the lowbit IR) without Python.
 *
 * Every function returns LOWBIT_OK (0) or an error code; lowbit_last_error() then says what went wrong
 * (thread-local, valid until the thread's next call). A file is never trusted: a truncated, damaged or
 * hostile file fails in lowbit_load_* with LOWBIT_ERROR_FORMAT / LOWBIT_ERROR_CHECKSUM, never crashes.
 * Shapes are per sample; tensors are float32, batch first, row-major (NCHW for images). */
#ifndef LOWBIT_H
#define LOWBIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The C API is what a shared liblowbit exports (it builds with hidden visibility for everything else). */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

enum {
  LOWBIT_OK = 0,
  LOWBIT_ERROR_IO = 1,          /* the file cannot be read */
  LOWBIT_ERROR_FORMAT = 2,      /* not a valid packed model: header, metadata, IR, tensor or shape check */
  LOWBIT_ERROR_CHECKSUM = 3,    /* the SHA-256 of the tensors and IR differs from the stored one */
  LOWBIT_ERROR_UNSUPPORTED = 4, /* valid, but needs something this runtime lacks (e.g. format version 1) */
  LOWBIT_ERROR_ARGUMENT = 5,    /* bad argument: null pointer, batch, unknown or unavailable kernel path */
  LOWBIT_ERROR_MEMORY = 6       /* out of memory */
};

typedef struct lowbit_model lowbit_model;

int lowbit_load_file(const char* path, lowbit_model** model);
int lowbit_load_memory(const void* data, size_t size, lowbit_model** model);
void lowbit_free(lowbit_model* model);

/* Per-sample shapes: writes up to max_dims sizes to dims and the rank to *rank. */
int lowbit_input_shape(const lowbit_model* model, int64_t* dims, int max_dims, int* rank);
int lowbit_output_shape(const lowbit_model* model, int64_t* dims, int max_dims, int* rank);

/* Kernel path for the kernel layers (bit planes and integer): "auto" (the fastest this CPU has), "scalar", "avx2", "avx512", "neon",
 * or "float" (every layer on the float code). The default is "auto". */
int lowbit_set_kernel_path(lowbit_model* model, const char* path);
const char* lowbit_kernel_path(const lowbit_model* model);
/* How many layers of the current plan run on the bit-serial kernels and on the integer kernels (the claim
 * policy: docs/export.md "Which kernels run a layer"); both 0 on the "float" path. */
int lowbit_kernel_layers(const lowbit_model* model, int64_t* bit_planes, int64_t* integer);
/* How many bit-serial layers of the current plan write the next layer's packed input themselves instead of
 * float outputs (the fused threshold epilogue, docs/export.md "Kernels"; AVX-512 register kernels, Co a multiple of 32). */
int lowbit_fused_layers(const lowbit_model* model, int64_t* fused);
/* Bit i set for every kernel path id i this CPU runs (ids as in lowbit's KERNEL_PATHS). */
int64_t lowbit_supported_paths(void);
/* Threads used by the binary kernels and the float layers' products (default 1); outputs are identical for
 * every thread count (each value is summed in the same order). */
int lowbit_set_threads(lowbit_model* model, int threads);

/* input: batch x input values, output: batch x output values (the caller's buffers). */
int lowbit_run(lowbit_model* model, const float* input, int64_t batch, float* output);

const char* lowbit_last_error(void);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif

#endif /* LOWBIT_H */
