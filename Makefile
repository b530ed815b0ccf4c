# Two commands for a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Both bootstrap .venv, Debian packages and data on first use and are no-ops afterwards.
# `make runtime` builds the native runtime (runtime/: liblowbit, lowbit-run, the sanitizer build and, when
# the aarch64 cross compiler is installed, the ARM64 build run under qemu by the tests); `make test` does too.
.PHONY: run test setup lint bench runtime

setup:
	@bash scripts/bootstrap.sh

run: setup
	.venv/bin/lowbit run configs/dcgan-mnist-w4a1.yaml

runtime:
	@nice -n 5 $(MAKE) -s -j2 -C runtime all asan
	@if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then nice -n 5 $(MAKE) -s -C runtime arm64; \
	else echo "runtime: no aarch64-linux-gnu-g++, skipping the ARM64 build (scripts/bootstrap.sh installs it as root)"; fi

test: setup runtime
	.venv/bin/pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
