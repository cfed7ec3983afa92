# `make test` builds everything it needs from scratch on a fresh machine, then runs the suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The PyTorch build to install. Default: the CPU wheel (tests, CI). On a GPU box, e.g.
#   make run TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0

.PHONY: test run lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# PyTorch first: a bare `torch` requirement would otherwise pull whatever build PyPI serves.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	# A real OpenAI-compatible server for the tests: llama.cpp's, compiled from source (several minutes on 2 cores).
	# If it cannot be built here, its tests are skipped and say why; nothing else depends on it.
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -e '.[dev,llama-server]' || \
		echo "make: WARNING: llama-cpp-python[server] could not be built: the real-server tests will be skipped" >&2
	touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

run: $(STAMP)
	$(VENV)/bin/idefics-bot run

# The same suite with a throwaway PostgreSQL server (Debian: apt-get install postgresql) in TEST_DATABASE_URL:
# the storage and Discord tests then run on SQLite and on PostgreSQL.
.PHONY: test-postgres
test-postgres: $(STAMP)
	tests/fakes/postgres/with-postgres.sh $(MAKE) test

# CPU benchmarks (tiny model); bench/gpu.py needs a CUDA GPU and is run by hand.
bench: $(STAMP)
	$(PY) -m bench.executor
	$(PY) -m bench.overhead
	$(PY) -m bench.batching
	$(PY) -m bench.families

clean:
	rm -rf $(VENV) .pytest_cache
