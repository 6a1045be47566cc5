# spotlens developer tasks: `make test`, `make demo`.
# The virtual environment is rebuilt only when pyproject.toml changes (stamp file).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: venv demo test clean

venv: $(STAMP)

# torch is installed first and pinned: the local CPU wheel is found by pip here, whereas an
# unpinned torch from the index would pull gigabytes of CUDA libraries.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[test,torch,histology]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/spotlens demo -o demo_output

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output
