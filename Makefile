# Two commands for a fresh machine with python3: `make bench` (the main job) and `make test`.
# Both create or reuse .venv and install what they need first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on disk on the project's CPU machines; an unpinned
# `torch` would download a multi-GB CUDA build. Override on a GPU machine if needed.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0

# constraints.txt: the versions the test suite last passed with (the ranges are in pyproject.toml).
CONSTRAINTS ?= constraints.txt
PIP := $(PYTHON) -m pip --disable-pip-version-check

.PHONY: bench test test-fast install lock clean

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH)" "$(TRITON)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(VENV)/bin/msa bench $(ARGS)

# one pytest worker per CPU (pytest-xdist): the interpreter-run kernel tests take most of the time
test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n auto $(ARGS)

# the edit loop: the tests not marked slow (a small case of each kernel family and layer, under a minute on a CPU)
test-fast: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

# after `make test` passed on upgraded packages: write their versions into constraints.txt
lock: $(VENV)/.installed
	{ sed -n '1,/^# ---/p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -v -E '^(torch|triton)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache .hypothesis
