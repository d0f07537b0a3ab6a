# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-kernels lint clean

# Re-install whenever the package metadata changes.
# PyTorch's wheels come to several GB: pip unpacks them under the venv rather than in /tmp (which
# may be a small separate disk), keeps no second copy in its cache, and its scratch goes after.
PIP_SCRATCH := $(abspath $(VENV))/pip-tmp
PIP_INSTALL := TMPDIR=$(PIP_SCRATCH) $(BIN)/python -m pip install --quiet --no-cache-dir
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(PIP_SCRATCH)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[all,test]'
	rm -rf $(PIP_SCRATCH)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/densenet train

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The suite again with the kernels of other CPUs: ATen and oneDNN limited to AVX2 (an AVX2-only
# CPU, no native bf16), then to scalar/SSE4.1 code, and our C kernels built for the same CPUs; and,
# on a CPU with AVX512_BF16, oneDNN without AMX and our kernels built for a CPU without tiles (the
# code AMD's Zen 4 runs). Tolerances must hold on every CPU kind.
# Each set gets inductor caches of its own: their keys don't include these settings, and kernels
# compiled for one set give wrong results under another.
test-kernels: $(STAMP)
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
		DENSENET_KERNEL_MARCH=x86-64-v3 \
		$(BIN)/python -m pytest -q -p no:cacheprovider
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 \
		DENSENET_KERNEL_MARCH=x86-64-v2 \
		$(BIN)/python -m pytest -q -p no:cacheprovider
	if grep -qw avx512_bf16 /proc/cpuinfo; then \
		TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 \
		DENSENET_KERNEL_MARCH=cooperlake \
		$(BIN)/python -m pytest -q -p no:cacheprovider; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
