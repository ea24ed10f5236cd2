# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned to the local CPU wheel here: a looser requirement pulls GBs of CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

# make run ARGS="--set osc.port=7100 --set extra_outputs.0.port=7870": any sdbridge run options.
ARGS ?=
run: $(STAMP)
	$(VENV)/bin/sdbridge run -c configs/default.yaml $(ARGS)

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check bridge tests obs touchdesigner
	$(VENV)/bin/ruff format --check bridge tests obs touchdesigner

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing; that is a failure of the suite, not a pass.
pytest: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; \
	exit $$rc

bench: $(STAMP)
	$(VENV)/bin/sdbridge bench --json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
