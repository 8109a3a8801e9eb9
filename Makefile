.PHONY: lint format typecheck test docs bench check

lint:
	ruff check higher tests examples benchmarks docs
	ruff format --check higher tests examples benchmarks docs

format:
	ruff format higher tests examples benchmarks docs
	ruff check --fix higher tests examples benchmarks docs

typecheck:
	mypy higher

test:
	python -m pytest

docs:
	sphinx-build -W --keep-going -n docs docs/_build/html

bench:
	python -m benchmarks

check: lint typecheck test
