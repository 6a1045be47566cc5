# spotlens developer tasks: `make test`, `make test-fast`, `make demo`.
# The virtual environment is rebuilt only when pyproject.toml changes (stamp file).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

# torch is installed first and pinned: the local CPU wheel is found by pip here, whereas an
# unpinned torch from the index would pull gigabytes of CUDA libraries.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[test,torch,histology,spatialdata]"
	touch $@

# --overwrite: a second `make demo` replaces the first one's files (only those) in demo_output/
demo: $(STAMP)
	$(VENV)/bin/spotlens demo -o demo_output --overwrite

# the whole suite (what CI runs: .ci/run calls `make test`)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# everything but the tests marked slow (pyproject.toml), for quick checks while developing
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output
