PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)

demo: $(VENV)
	$(BIN)/python -m cpmlive.demo

test: $(VENV)
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/python -m pytest -q

bench: $(VENV)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
