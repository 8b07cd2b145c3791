# Two commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv with Python 3.11 and install the package into it first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# 8 simulated CPU devices so that sharded code paths run in the tests (tests/conftest.py adds
# the fast-compile flag of tests/xla_flags.py).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=2
DEMO_WORKDIR ?= workdirs/demo

.PHONY: install test demo clean

$(VENV)/.installed: setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	# timm without its declared torchvision (see setup.py, the test extra).
	$(PY) -m pip install --quiet --no-deps timm==1.0.31
	touch $@

install: $(VENV)/.installed

# lint-imports first: the import layering of .importlinter (docs/design.md, "Layers").
test: install
	$(VENV)/bin/lint-imports
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --durations=20 tests

demo: install
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m experiments.demo --workdir=$(DEMO_WORKDIR)

clean:
	rm -rf $(VENV) workdirs
