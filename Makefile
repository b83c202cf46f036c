# `make test` works on a fresh machine: it creates (or reuses) .venv, installs what is
# missing with the tested pins in constraints.txt, then runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.visionzoo-installed
SMOKE := $(CURDIR)/build/smoke

.PHONY: install test lint smoke-installed clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt setuptools wheel torch torchvision
	# natten is a source package that builds against the torch installed above
	$(PIP) install -q -c constraints.txt --no-build-isolation natten
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# A non-editable wheel in its own venv (dependencies shared from .venv), tested from outside the repository.
smoke-installed: install
	rm -rf $(SMOKE) && mkdir -p $(SMOKE)
	$(PIP) wheel -q --no-deps -w $(SMOKE)/dist .
	$(PY) -m venv $(SMOKE)/venv
	$(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))" > \
		"$$($(SMOKE)/venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/visionzoo-deps.pth"
	$(SMOKE)/venv/bin/python -m pip install -q --disable-pip-version-check --no-deps $(SMOKE)/dist/*.whl
	cd /tmp && $(SMOKE)/venv/bin/python -c "import visionzoo.kernels as k, visionzoo as v; \
		assert all('$(SMOKE)/venv' in m.__file__ for m in (v, k)), (v.__file__, k.__file__); print('installed at', v.__file__)"
	cd /tmp && $(SMOKE)/venv/bin/python -m pytest -q -p no:cacheprovider -m smoke --rootdir=$(CURDIR) $(CURDIR)/tests

clean:
	rm -rf $(VENV) build dist *.egg-info
