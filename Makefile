# Two commands for a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Both bootstrap .venv, Debian packages and data on first use and are no-ops afterwards.
.PHONY: run test setup lint bench

setup:
	@bash scripts/bootstrap.sh

run: setup
	.venv/bin/lowbit run configs/dcgan-mnist-w4a1.yaml

test: setup
	.venv/bin/pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
