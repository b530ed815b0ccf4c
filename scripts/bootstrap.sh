#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian data/browser packages and the ARM64 cross toolchain + qemu-user
# for the native runtime's tests (when root),
# the .venv with pinned dependencies, and the MNIST cache. A second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=.venv/.lowbit-installed
HASH=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)

install_debian_packages() {
    local wanted=()
    [ -d /usr/share/datasets/fashion-mnist ] || wanted+=(dataset-fashion-mnist)
    command -v chromium >/dev/null 2>&1 || wanted+=(chromium)
    command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || wanted+=(g++-aarch64-linux-gnu)
    command -v qemu-aarch64 >/dev/null 2>&1 || wanted+=(qemu-user)
    [ ${#wanted[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: not root or no apt-get; skipping Debian packages: ${wanted[*]}" >&2
        return 0
    fi
    echo "bootstrap: apt-get install ${wanted[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${wanted[@]}" >/dev/null
}

install_venv() {
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
        return 0
    fi
    echo "bootstrap: creating .venv (torch==2.13.0 CPU, pinned)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[dev]"
    echo "$HASH" > "$STAMP"
}

install_debian_packages
install_venv
.venv/bin/lowbit data prepare mnist --quiet
