# lfm2edge: `make demo` runs the main job, `make test` the tests. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lfm2edge-installed
MODEL  ?= LiquidAI/LFM2.5-ColBERT-350M
PYTEST_ARGS ?=

.PHONY: setup llama test demo bench lint clean dist dist-check

# The virtualenv with the project and its extras. The patched llama-cpp-python is built and
# installed first (patches/build.py), so pip finds llama-cpp-python==0.3.36 already there and
# never compiles the stock sdist itself. torch==2.13.0 is the CPU build. The editable install
# also compiles the MaxSim kernel (runtime/core/_maxsim.c) in place.
$(STAMP): pyproject.toml patches/build.py $(wildcard patches/*/*.patch) runtime/core/_maxsim.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel "scikit-build-core>=0.9.2"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) patches/build.py --python $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Rebuilds llama-cpp-python only when its flags or patches changed (seconds otherwise).
setup: $(STAMP)
	@$(PY) patches/build.py --python $(PY)

# The stock binding (no lfm2edge patches): LFM2EDGE_PATCHES=0 make setup test
llama: $(STAMP)
	$(PY) patches/build.py --python $(PY)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m lfm2edge.runtime.frontends.demo --model "$(MODEL)"

# The bench's tables on stdout, its results as JSON (schema: bench/README.md) and its latency plot.
BENCH_OUT ?= bench-results
bench: setup
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/lfm2edge bench --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png

lint: setup
	$(PY) -m ruff check .

# Release wheels in dist/ (patches/dist.py): the patched llama-cpp-python built with portable flags
# (every x86-64 ISA level, chosen at load time) and lfm2edge's own wheel, repaired for manylinux.
# Several minutes on 2 cores; not part of `make test`.
dist:
	$(PYTHON) patches/dist.py build

# A fresh venv installs dist/'s wheels with no compiler (--only-binary) and runs the demo on a tiny
# random ColBERT made by the project venv, or on DIST_MODEL=file.gguf.
DIST_MODEL ?=
dist-check: setup
	$(PY) patches/dist.py check $(if $(DIST_MODEL),--model "$(DIST_MODEL)")

clean:
	rm -rf $(VENV) .pytest_cache runtime/core/_maxsim*.so
