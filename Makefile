# Two entry points for a fresh machine: `make run` (set up, then the research loop on the
# built-in dataset, which it prepares) and `make test` (set up, run the test suite on the CPU).
# `make train` is the single 60 s training run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On the CPU machines this resolves to a local wheel; elsewhere pip fetches that release.
TORCH_SPEC ?= torch==2.13.0
DATA ?= data/synthetic
OUT ?= out/synthetic
BUDGET_S ?= 60

.PHONY: setup run train test lint clean gpudeps

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,hf]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m agent.loop

train: setup
	@# only where no cache is: DATA=<a real dataset's cache> must not be rebuilt as the synthetic one
	[ -f "$(DATA)/manifest.json" ] || $(PY) -m eclip.prepare --dataset synthetic --out $(DATA)
	$(PY) -m eclip.train --data $(DATA) --out $(OUT) --budget-s $(BUDGET_S)

test: setup
	@$(PY) -m pytest -q -n auto; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): failing" >&2; fi; exit $$rc

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# Pure-Python extras for a GPU machine that has only torch, triton and numpy: carry .gpudeps.
gpudeps: setup
	$(PY) -m pip install --quiet --target .gpudeps --no-deps --only-binary=:all: --python-version 3.12 -c constraints.txt \
	    --implementation cp --platform manylinux2014_x86_64 safetensors tqdm pytest pluggy iniconfig packaging pygments \
	    pytest-benchmark py-cpuinfo2
