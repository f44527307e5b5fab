# nanoseek: `make test` and `make speedrun` set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On these machines torch==2.13.0 resolves to the local CPU wheel; installing it first keeps pip
# from pulling a multi-GB CUDA build to satisfy `torch>=2.6`. Override on GPU hosts if needed.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
SPEEDRUN_ARGS ?=
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: venv test test-all lint bench speedrun clean

venv: $(STAMP)

# The speedrun needs only the runtime dependencies; the tests also need the dev extras (the oracles).
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	$(PY) -c "from nanoseek.model import cpu_ops; cpu_ops.load()"  # build the fused CPU kernels once
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole R1 pipeline at micro scale on built-in tasks; resumes when interrupted.
# `make speedrun SPEEDRUN_ARGS="--seeds 0 1 2"`, `SPEEDRUN_ARGS=--quick`, `SPEEDRUN_ARGS=--force`.
speedrun: $(RUNTIME_STAMP)
	$(VENV)/bin/nanoseek speedrun $(SPEEDRUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# Every speed benchmark, one JSON line each (ours, baseline, ratio): `make bench`, or a few of them with
# `make bench BENCHMARKS="decode rollout"`. grpo_learning.py and train_fp8_vs_bf16.py are learning
# experiments (tens of minutes): run them directly.
BENCHMARKS ?= few_rows_linear fp8_linear train_step train_throughput rollout grpo_step prefix_cache serve_load decode
bench: $(STAMP)
	set -e; for name in $(BENCHMARKS); do $(PY) benchmarks/$$name.py; done

lint: $(STAMP)
	$(VENV)/bin/ruff check nanoseek tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
