# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A bare `torch` requirement can pull a multi-GB CUDA build; the pinned CPU build is installed first.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint typecheck pytest bench bench-replay bench-scale gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>/dev/null || true
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,ray]"
	touch $@

install: $(VENV)/.installed

# The main job on built-in defaults: record routing from the built-in demo MoE model (a small
# Qwen3-MoE trained on Python's own sources), analyse it, simulate expert caches on it, and replay
# a few strategies' copies (on CUDA when the venv's torch sees a GPU, else the CPU backend).
DEMO_DEVICE = $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

demo: install
	mkdir -p demo-out
	$(VENV)/bin/moeprof record -o demo-out/demo.moe --force
	$(VENV)/bin/moeprof analyze demo-out/demo.moe --batch-sizes 1,2,4,8,16,32,64 \
	  --json demo-out/results.json --markdown demo-out/report.md --plot demo-out/savings.png --force
	$(VENV)/bin/moeprof cache demo-out/demo.moe --strategies lru,lfu,static,belady \
	  --cache-experts 0,1k,2k,4k --batch-sizes 1,8 --policy decode --json demo-out/cache.json \
	  --markdown demo-out/cache.md --plot demo-out/cache.png --force
	$(VENV)/bin/moeprof replay demo-out/demo.moe --device $(DEMO_DEVICE) \
	  --strategies naive,dedup,lru,belady --cache-experts 4 --batch-sizes 8 --policy decode \
	  --expert-bytes 1048576 --max-batches 50 --json demo-out/replay.json \
	  --markdown demo-out/replay.md --force
	$(VENV)/bin/moeprof record --prompts moeprof/demo/data/serve_prompts.txt -n 16 -b 32 \
	  -o demo-out/serve.moe --force
	$(VENV)/bin/moeprof schedule demo-out/serve.moe --batch-sizes 8,32 \
	  --admission fifo,random,affinity,oracle,group,group-oracle --cache lru:4 \
	  --json demo-out/schedule.json --markdown demo-out/schedule.md --plot demo-out/schedule.png \
	  --force

lint: install
	$(VENV)/bin/ruff check moeprof tests benchmarks scripts
	$(VENV)/bin/ruff format --check moeprof tests benchmarks scripts

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: install
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_schedule.py
	$(PY) benchmarks/bench_record.py

bench-replay: install
	$(PY) benchmarks/bench_replay.py

# Traces of 10 M, 100 M and 1 B routing decisions (1 B: about 2 GB of ids, 25 minutes on 2 cores).
bench-scale: install
	$(PY) benchmarks/bench_scale.py --sizes 10M,100M,1B

# On a GPU machine: gpu tests, doctor, replays, summary (uses whatever python has torch).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
