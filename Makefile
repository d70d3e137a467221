# meteora-jax: `make demo` runs the embedded end-to-end demo, `make test` the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core
STAMP := $(VENV)/.installed
# Tests see 8 simulated CPU devices so the sharding code runs on a real multi-device mesh; the CPU
# backend only, so an installed libtpu (`make tpu-compile`) is never initialised by the test workers.
CPU_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# Compiling is most of the suite's time (about 4000 small programs). XLA:CPU compiles them much
# faster with LLVM -O0 and its LLVM IR fusion emitters: the suite takes half the time (measured
# in the commit that set it). Programs users run keep XLA's defaults.
TEST_FLAGS := --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 $(TEST_FLAGS)" JAX_PLATFORMS=cpu

.PHONY: install test tpu-compile demo lint format clean

install: $(STAMP)

# The package alone (jax, flax, optax, ...): all `make demo` needs.
$(CORE): pyproject.toml
	@echo "make: meteora-jax and its dependencies (jax, flax, optax, transformers, ...) into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e .
	@touch $(CORE)

$(STAMP): $(CORE)
	@echo "make install: the test tools (pytest, torch CPU, peft, ruff, ...) into $(VENV)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	@touch $(STAMP)

# The TPU programs are `make tpu-compile`'s: compiling them takes minutes, and not with TEST_FLAGS.
test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --durations=15 \
		--ignore=tests/test_tpu_compile.py tests

# The [tpu] extra (libtpu) into the venv, then programs compiled for TPU slices from this host.
tpu-compile: $(STAMP)
	$(BIN)/pip install --quiet -e '.[tpu]'
	$(CPU_ENV) $(BIN)/python -m pytest -q tests/test_tpu_compile.py tests/test_aot_parts.py

demo: $(CORE)
	$(BIN)/meteora-jax demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
