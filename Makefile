# The two set-up commands of the README: `make demo` (install + offline demo) and `make test`.
PY ?= python3
VENV := .venv

.PHONY: demo test clean-demo

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0   # CPU build first, never the CUDA one
	$(VENV)/bin/python -m pip install --quiet -e '.[test,serve,export,trackers,hf]'   # as .ci/run
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/honelm demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 -q

clean-demo:
	rm -rf demo-runs
