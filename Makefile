# Two entry points, each setting up from scratch: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-local-mode test-browser image bench clean

$(VENV)/.installed: requirements.txt entry_point/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) infra/launch.py

test: setup
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m "slow and not docker and not browser"

test-local-mode: setup
	bash infra/local_mode_ci.sh

test-browser: setup
	bash infra/browser_ci.sh

image:
	bash docker/build.sh

bench: setup
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/review.py
	$(PY) benchmarks/reliability.py

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results
