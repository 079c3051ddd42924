# The two commands of the README: `make run` and `make test`.
# Both create .venv with Python 3.13 when it is missing and install the project.

VENV   := .venv
PY     := $(VENV)/bin/python
# python3.13 may be a pyenv shim that fails unless selected; take the first
# interpreter that really runs.
PYTHON313 := $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/local/bin/python3.13 /usr/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 && { echo $$p; break; }; done)
STAMP  := $(VENV)/.installed

CONFIG ?= configs/registry.yaml
PYTEST_ARGS ?=

.PHONY: run test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON313)" || { echo "python3.13 not found" >&2; exit 1; }
	test -x $(PY) || $(PYTHON313) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p data
	$(VENV)/bin/trustnet registry --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/registry_http.py

clean:
	rm -rf $(VENV) data *.egg-info
