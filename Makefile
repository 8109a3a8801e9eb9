.PHONY: lint format typecheck test bench check

lint:
	ruff check higher tests examples benchmarks
	ruff format --check higher tests examples benchmarks

format:
	ruff format higher tests examples benchmarks
	ruff check --fix higher tests examples benchmarks

typecheck:
	mypy higher

test:
	python -m pytest

bench:
	python -m benchmarks

check: lint typecheck test
