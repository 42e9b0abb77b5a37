# Two commands: `make demo` and `make test`. Both set up .venv from requirements.txt first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# DEMO_ARGS: extra `dit-jax demo` arguments, e.g. DEMO_ARGS=--workdir=/tmp/digits
demo: venv
	$(VENV)/bin/dit-jax demo $(DEMO_ARGS)

# the suite on one worker process per core, at most 4 (pytest-xdist; TEST_WORKERS=0 runs it in this process)
TEST_WORKERS ?= logical --maxprocesses=4
test: venv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# everything but the tests marked slow
test-fast: venv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
