# Two commands for a fresh machine with python3: `make bench` (the main job) and `make test`.
# Both create or reuse .venv and install what they need first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on disk on the project's CPU machines; an unpinned
# `torch` would download a multi-GB CUDA build. Override on a GPU machine if needed.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0

.PHONY: bench test install clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check "$(TORCH)" "$(TRITON)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(VENV)/bin/msa bench $(ARGS)

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache .hypothesis
