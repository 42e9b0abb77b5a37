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

test: venv
	$(VENV)/bin/python -m pytest -q tests

# everything but the tests marked slow
test-fast: venv
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
