# Two entry points, each setting up from scratch: `make demo` (python infra/launch.py: the demo job and its report) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-local-mode test-cuda-image test-browser image bench clean

$(VENV)/.installed: requirements.txt entry_point/requirements.txt infra/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	# rt-utils writes the RTSTRUCTs the tests read; kept apart (it ships a top-level `tests` package and
	# pins opencv-python and a dataclasses backport), its cv2 from requirements.txt's headless OpenCV.
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/rt-utils rt-utils==1.2.7
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) infra/launch.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m "slow and not docker and not browser"

test-local-mode: setup
	bash .ci/local_mode.sh

# The CUDA image (several GB, opt-in: not in .ci/run) built offline and its two local-mode jobs run on this CPU.
test-cuda-image: setup
	VARIANT=cuda IMAGE=brainseg-train:cuda bash .ci/local_mode.sh

test-browser: setup
	bash .ci/browser.sh

image:
	bash docker/build.sh

bench: setup
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/gpu_feed.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/review.py
	$(PY) benchmarks/reliability.py
	$(PY) benchmarks/peer.py
	$(PY) benchmarks/predict.py --cases 2 --mirror

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results
