# Paper figures: `make figures` runs the default sweep (experiments/paper.yaml, a few minutes on
# 2 CPU cores) into results/paper-<timestamp> and writes every figure and figures.md there.
# OUT=DIR reuses a sweep directory: complete runs are kept, missing or failed ones run.
PYTHON ?= python
OUT ?=

.PHONY: figures figures-quick test

figures:
	$(PYTHON) -m experiments.paper $(if $(OUT),--out $(OUT))

figures-quick:  ## the tiny sweep the tests use (~30 s): checks the pipeline, not the numbers
	$(PYTHON) -m experiments.paper --quick $(if $(OUT),--out $(OUT))

test:
	$(PYTHON) -m pytest
