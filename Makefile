# make demo: set up and run the CPU demo (shapes -> CLIP -> prior -> decoder -> upsampler -> samples -> metrics)
# make test: set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) demo.py

test: install
	$(PY) -m pytest -q -m "not gpu"

test-all: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests *.py

clean:
	rm -rf $(VENV) outputs/* .pytest_cache
