#!/bin/sh
# Prints the kernel-path ids as compiler defines (-DLOWBIT_PATH_SCALAR=0 ...), read from KERNEL_PATHS in the
# Python build module, so the native runtime and the torch extension share one definition.
set -eu
build_py="$(dirname "$0")/../src/lowbit/export/backends/x86/build.py"
grep '^KERNEL_PATHS = (' "$build_py" | tr -d '(),"' | cut -d= -f2 |
    awk '{ for (i = 1; i <= NF; ++i) printf "-DLOWBIT_PATH_%s=%d ", toupper($i), i - 1 }'
