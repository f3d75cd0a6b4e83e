PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# OpenBMB's ModelCenter, the CPM-2 reference the tests run (its bmtrain needs CUDA: a stand-in replaces it)
	$(BIN)/pip install --quiet --no-deps model-center==1.0.2
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
