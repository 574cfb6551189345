# amortized-nlme: every target sets up its own virtual environment (Python 3.12, see .python-version).
SHELL := /bin/bash
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12 2>/dev/null))
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= mrna_simple
N ?=
DASK ?=
DATA ?=
POP ?=
export KERAS_BACKEND ?= jax
export OPENBLAS_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

COVARIATES ?=
CONFIG ?=

.PHONY: setup simulate train check infer select demo demo-cells test test-all bench bench-peers estimator-table clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PY312)" || { echo "Python 3.12 not found (pyenv install 3.12 or set PY312=/path/to/python3.12)"; exit 1; }
	test -x $(PY) || $(PY312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tensorflow,dask]"
	touch $(STAMP)

simulate: $(STAMP)
	$(VENV)/bin/amortized-nlme simulate $(MODEL) $(if $(N),-n $(N)) $(if $(DASK),--dask $(DASK)) $(if $(CONFIG),--config $(CONFIG))

train: $(STAMP)
	$(VENV)/bin/amortized-nlme train $(MODEL) $(if $(CONFIG),--config $(CONFIG))

check: $(STAMP)
	$(VENV)/bin/amortized-nlme check $(MODEL) $(if $(CONFIG),--config $(CONFIG))

infer: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make infer MODEL=<model> DATA=<csv> [POP=<population.toml>] [CONFIG=<workflow.toml>]"; exit 2; }
	$(VENV)/bin/amortized-nlme infer $(MODEL) --data $(DATA) $(if $(POP),--pop $(POP)) $(if $(CONFIG),--config $(CONFIG))

select: $(STAMP)
	@test -n "$(DATA)" -a -n "$(COVARIATES)" || { echo "usage: make select MODEL=<model> DATA=<csv> POP=<pop.toml> COVARIATES='lwt sex'"; exit 2; }
	$(VENV)/bin/amortized-nlme select-covariates $(MODEL) --data $(DATA) $(if $(POP),--pop $(POP)) --covariates $(COVARIATES) $(if $(CONFIG),--config $(CONFIG))

# the shipped pk_1cmt_iv estimator fits NONMEM's phenobarbital example as NONMEM reads it (about a minute)
demo: $(STAMP)
	$(VENV)/bin/amortized-nlme infer pk_1cmt_iv --data example:pheno.csv --pop pheno.toml --out results/demo-pheno \
		--profile B_V_apgar_low
	@echo "NONMEM FOCE-I on the same data and model: CL 0.00470, V 0.984, Apgar<5 factor 1.159, OFV 586.276" \
		"(compare results/demo-pheno/report.md)"

# the shipped mrna_simple estimator fits the Fröhlich eGFP + d2eGFP single-cell data (two-group population model;
# about 25 minutes on 2 cores: the exact likelihood refines most cells' proposals, see the README)
demo-cells: $(STAMP)
	$(VENV)/bin/amortized-nlme infer mrna_simple --data amortized_nlme/example_data/froehlich2018_single_cell_gfp.csv.gz \
		--pop workflows/populations/froehlich_all_random.toml --out results/demo-froehlich \
		--profile "beta_gamma[eGFP]" "beta_gamma[d2eGFP]"

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/simulate.py --quick
	$(PY) benchmarks/objective.py
	$(PY) benchmarks/inference.py --sizes 100 1000 10000
	$(PY) benchmarks/mrna_paper.py --sizes 100 1000 --json results/bench/mrna_paper_mrna_simple.json
	$(PY) benchmarks/theophylline.py
	$(PY) benchmarks/pheno.py
	$(PY) benchmarks/pk_recovery.py
	$(PY) benchmarks/exact_weights_cost.py

# replicate calibration of the exact likelihood (independent simulator, 40 studies each of 50 and 1,000 subjects)
bench-calibration: $(STAMP)
	$(PY) benchmarks/exact_calibration.py --sizes 50 1000 --replicates 40

config-reference: $(STAMP)
	$(PY) -c "from amortized_nlme.config import update_readme_reference; update_readme_reference('README.md')"

bench-peers: $(STAMP)
	$(PY) benchmarks/peers/run.py

# the README's table of shipped estimators, rendered from trained_models/*/meta.json (tests/test_diagnostics.py fails
# when it is stale)
estimator-table: $(STAMP)
	$(PY) -c "from amortized_nlme.training.check import update_readme_table; update_readme_table('README.md')"

clean:
	rm -rf $(VENV) results .pytest_cache
