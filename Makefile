# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first.
VENV ?= .venv

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mixbits demo

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/qat.py
