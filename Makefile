# The two commands of the README: `make demo` and `make test`. Both bootstrap from a
# fresh machine: a .venv with the pinned install set, the npm packages of the JS device
# harness, and Debian's chromium for the browser test. Every step is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spliteasy-installed
JS := device_tf/js
JS_STAMP := $(JS)/node_modules/.spliteasy-installed

.PHONY: install demo test bench fuzz lint js browser schema golden clean

# --no-compile: pip would byte-compile all ~19,600 .py files of the install set (329 MB
# of source, ~95 CPU s here); the suite imports ~6,700 of them (127 MB), which Python
# compiles on first import into the same __pycache__ dirs. The rest is never compiled.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-compile --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund
	touch $(JS_STAMP)

js: $(JS_STAMP)

# Debian's chromium for the browser device test (a test tool's own browser download
# cannot work on a closed network).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else sudo apt-get update -q && sudo apt-get install -y -q chromium; fi; }

demo: install
	$(BIN)/spliteasy demo

test: install js browser
	$(BIN)/python -m pytest

# the hostile-input suite at 10x its test-time size (~10,000 generated requests)
fuzz: install
	SPLITEASY_FUZZ_SCALE=10 $(BIN)/python -m pytest tests/test_server_fuzz.py -q -s -p no:randomly -n 0

bench: install js
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-json=runs/bench.json
	$(BIN)/python benchmarks/device_runtimes.py --out runs/bench-device.json

# issue #12: per-step device compute of the ResNet50 / MobileNetV2 stem/head bundles in
# Python TF, TFLite and TF.js (Node cpu; headless Chromium cpu and webgl), and the
# kernel-by-kernel gaps (tens of minutes: webgl runs on SwiftShader here; converts the bundles
# once into the test cache); the table also goes to runs/bench-device.md
bench-device: install js
	$(BIN)/python benchmarks/device_runtimes.py --out runs/bench-device.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

schema: install
	$(BIN)/python -m shared_schema.export_schema

# golden test data both the Python and the JS side assert (rewrite only on purpose)
golden: install
	$(BIN)/python tests/golden/make_frames.py
	$(BIN)/python tests/golden/make_math.py

clean:
	rm -rf $(VENV) $(JS)/node_modules .pytest_cache .cache
