# The two commands: `make test` and `make train` (each sets up .venv first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; a CUDA torch already in the venv is kept.
TORCH ?= torch==2.13.0
EXTRAS ?= test,triton,train,fed
PYTEST_ARGS ?=
SOURCES := setup.py pyproject.toml $(shell find python csrc zo_kernels -type f \
             -not -name '*.so' -not -path '*__pycache__*' 2>/dev/null)

.PHONY: install test train bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation ".[$(EXTRAS)]"
	touch $@

# pytest's exit code 5 means it collected nothing: a broken suite, not a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# A short ZO run of GPT-2 20M on the offline KJV corpus: runs/make-train/ gets the CSV and plots.
train: install
	$(PY) -m zo_opt.train --mode ZO --q 4 --batch_size 2 --learning_rate 1e-4 --max_steps 30 \
	  --eval_interval 15 --eval_blocks 16 --save_interval 0 --log_dir runs --run_name make-train

# CPU benchmarks (under 10 minutes here); the table and chart land in benchmarks/results/.
bench: install
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks --benchmark-only -p no:cacheprovider --benchmark-json=.benchmarks/latest.json
	$(PY) benchmarks/report.py .benchmarks/latest.json

clean:
	rm -rf build *.egg-info python/*.egg-info python/zo_opt/_C*.so
