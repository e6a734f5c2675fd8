# make test            set up .venv (if missing) and run the test suite
# make test-triton36   the Triton tests under triton 3.6.0's interpreter (the GPU machines' triton), in .venv-triton36
# make dist   the sdist and the wheel (with the compiled extension) in dist/, built against .venv's torch
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facd-installed

.PHONY: setup test test-triton36 demo dist clean

$(STAMP): requirements/ci.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements/ci.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation -c requirements/ci.txt -e ".[test,train,deploy]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-triton36:
	PYTHON=$(PYTHON) scripts/triton36_lane.sh

# make demo   set up, then teacher + three students on the built-in photos, table and plots in runs/demo/ (replaced)
demo: setup
	$(BIN)/python -m facd_fast demo --overwrite

# --no-isolation: an isolated build would download a CUDA torch to compile against.
dist: setup
	$(BIN)/python -m build --no-isolation --outdir dist .

clean:
	rm -rf build dist *.egg-info facd_fast/*.so
