# Corral developer entry points. `make run` and `make test` are all a fresh machine needs.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
DEPS    := $(VENV)/.deps-stamp
PROTOS  := $(wildcard proto/corral/v1/*.proto)
PB2     := $(PROTOS:.proto=_pb2.py)
PYX     := $(wildcard ext/*.pyx)
EXT_SO  := $(VENV)/.ext-stamp
PYTEST_ARGS ?=

.PHONY: build run test test-unit bench lint clean proto ext sysdeps

build: $(DEPS) proto ext
	@# byte-compile once: a cold `corral run` must not recompile sources on every start
	$(PY) -m compileall -q runtime sandbox ext proto/corral examples bench >/dev/null

# The virtualenv with runtime + dev dependencies and an editable install of corral.
$(DEPS): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77" wheel "cython>=3.0,<4"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

proto: $(DEPS) $(PB2)

proto/corral/v1/%_pb2.py: proto/corral/v1/%.proto $(DEPS)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

ext: $(DEPS) $(EXT_SO)

$(EXT_SO): $(PYX) $(wildcard ext/*.pxd) ext/corral_init.c setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

# The main job on embedded defaults: run the example agent inside a default sandbox, then
# the two modes in one loop (a session chatting while its delegated deep task runs).
run: build
	$(PY) examples/demo.py
	$(PY) examples/pair_demo.py

# System packages the tests use (bubblewrap, docker.io, openssl, curl): installed when missing.
sysdeps:
	bash .ci/system-deps

test: build sysdeps
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-unit: build
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

bench: build sysdeps
	$(PY) bench/spawn.py --json
	$(PY) bench/stream_core.py --json
	$(PY) bench/stream_loop.py --json
	$(PY) bench/audit.py --json
	$(PY) bench/sessions.py --json
	$(PY) bench/egress.py --json
	$(PY) bench/scheduler.py --json
	$(PY) bench/density.py
	$(PY) bench/exec_stream.py
	$(PY) bench/files.py
	$(PY) bench/audit_flood.py --json
	$(PY) bench/audit_sinks.py --json

lint: build
	$(VENV)/bin/ruff check runtime sandbox ext tests bench examples
	PYTHONPATH=proto $(VENV)/bin/lint-imports --no-cache  # tests/unit/test_layers.py: why

clean:
	rm -rf $(VENV) build *.egg-info ext/*.c ext/*.so ext/*.html \
	       proto/corral/v1/*_pb2.py proto/corral/v1/*_pb2.pyi proto/corral/v1/*_pb2_grpc.py \
	       .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
