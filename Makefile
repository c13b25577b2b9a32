# Two entry points: `make demo` (the main job end to end on a small real teacher) and `make test`.
# Both create the virtual environment on first use; torch comes first, pinned to the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= .demo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test lint demo clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# A small Llama-style teacher trained for a few minutes on local text (cached in $(DEMO)/teacher), then a
# cache of its targets over part of that text, then a look at what was stored.
demo: install
	$(BIN)/python -m tools.demo_teacher --output $(DEMO)/teacher
	rm -rf $(DEMO)/cache
	$(BIN)/teacher-cache build --model $(DEMO)/teacher --dataset $(DEMO)/teacher/corpus/train.jsonl \
		--output $(DEMO)/cache --seq-len 256 --max-samples 256 --batch-size 8 --samples-per-shard 64 \
		--hidden-layers -1
	$(BIN)/teacher-cache info $(DEMO)/cache
	$(BIN)/teacher-cache verify $(DEMO)/cache
	$(BIN)/teacher-cache export $(DEMO)/cache $(DEMO)/cache.parquet

clean-demo:
	rm -rf $(DEMO)
