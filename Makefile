# make study: the project's main job on the embedded default. make test: the test suite.
# Both create the virtual environment when it is missing and install the exact, tested pins.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/misalign/torch_extensions
export DS_ACCELERATOR ?= cpu
export TRL_EXPERIMENTAL_SILENCE := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv study test lint clean

# pip compiles every package's bytecode at install (about 36 s more on 2 cores). Never --no-compile: where
# PYTHONDONTWRITEBYTECODE is set, as on many CI images and on ours, nothing is compiled on import either, and every
# process then compiled torch, transformers, peft and Ray from source at each start: `import torch, transformers,
# peft` took 12.8 s instead of 5.8 s, and the suite ran 2.2x slower (a killed-driver study test 105 s against 48 s)
$(BIN)/misalign: pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone: the pinned CPU build (never the CUDA wheels an unpinned resolve would pull)
	$(BIN)/pip install -q -c constraints/ci.txt torch
	$(BIN)/pip install -q -c constraints/ci.txt -e ".[dev,study,lmeval]"
	touch $(BIN)/misalign

venv: $(BIN)/misalign

# the default study on a local Ray, the cheapest-attack search (reusing the study's stages), then the report;
# rerunning resumes each step (finished cells and trials are not redone). The study ends with its own summary
# line; `misalign study status runs/study-tiny` says more (preemptions, failed attempts)
study: venv
	$(BIN)/misalign study run configs/study-tiny.yaml --storage runs
	$(BIN)/misalign search attack configs/search-attack-tiny.yaml --storage runs --stages runs/study-tiny/stages
	$(BIN)/misalign report runs/study-tiny --search runs/search-attack-tiny --out runs/study-tiny/report

test: venv
	$(BIN)/ruff check src tests bench analysis
	$(BIN)/pytest -q --durations=30  # the slowest tests, so the suite's time stays in sight

lint: venv
	$(BIN)/ruff check src tests bench analysis
	$(BIN)/ruff format --check src tests bench analysis

clean:
	rm -rf $(VENV) runs .pytest_cache
