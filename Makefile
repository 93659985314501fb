# Fresh machine: `make demo` (main job) and `make test` (test suite) create .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/main

.PHONY: setup demo test bench bench-scale results results-runs clean

# ccexam ships a pretrained MNIST CNN (tests/importers_test.py); its torch deps are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps ccexam
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m experiments.run experiments/main.py --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q

# ~10 min on 2 cores; the 10,000 x 1,000 scale run (~5 min) is `make bench-scale`.
bench: setup
	$(PY) -m pip install -e '.[bench]'
	for f in $(filter-out benchmarks/scale_bench.py,$(wildcard benchmarks/*_bench.py)); do \
	  $(PY) $$f || exit 1; done

# docs/results.md and the README's findings block from the committed docs/results/ (seconds).
results: setup
	$(PY) -m stability.report

# Every study afresh into runs/results/, then its summaries into docs/results/ (~30 min, 2 cores).
STUDY_CONFIGS := main stability_hparams stability_M stability_members compare_merges theory_compare hetero
results-runs: setup
	for s in $(STUDY_CONFIGS); do rm -rf runs/results/$$s; \
	  $(PY) -m experiments.run experiments/$$s.py --workdir runs/results/$$s || exit 1; done
	$(PY) -m stability.report --collect runs/results

bench-scale: setup
	$(PY) benchmarks/scale_bench.py

clean:
	rm -rf $(VENV) runs
