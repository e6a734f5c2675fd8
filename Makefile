# make test   set up .venv (if missing) and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facd-installed

.PHONY: setup test demo clean

$(STAMP): requirements/ci.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements/ci.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation -c requirements/ci.txt -e ".[test,train]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# make demo   set up, then teacher + three students on the built-in photos, table and plots in runs/demo/
demo: setup
	$(BIN)/python -m facd_fast demo

clean:
	rm -rf build *.egg-info facd_fast/*.so
