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

.PHONY: run run-cluster test soak venv clean bench

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

# Three replicas of one registry on [::1]: HTTP 8000/8010/8020, Raft and node
# links on 8001/8011/8021 (configs/cluster/r1.yaml r2.yaml r3.yaml); data
# under data/cluster/. Ctrl-C stops all three (the leader hands over first).
# The replicas' shared secret is REGISTRY_CLUSTER_SECRET, or a new random one.
run-cluster: $(STAMP)
	mkdir -p data/cluster/r1 data/cluster/r2 data/cluster/r3
	export REGISTRY_CLUSTER_SECRET=$${REGISTRY_CLUSTER_SECRET:-$$($(PY) -c 'import secrets; print(secrets.token_hex(24))')}; \
	trap 'kill -TERM $$p1 $$p2 $$p3 2>/dev/null; wait' INT TERM; \
	$(VENV)/bin/trustnet registry --config configs/cluster/r1.yaml & p1=$$!; \
	$(VENV)/bin/trustnet registry --config configs/cluster/r2.yaml & p2=$$!; \
	$(VENV)/bin/trustnet registry --config configs/cluster/r3.yaml & p3=$$!; \
	wait

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Hours of seeded consensus simulations (SOAK_HOURS, SOAK_START); prints seeds/s.
SOAK_HOURS ?= 1
SOAK_START ?= 1000
soak: $(STAMP)
	$(PY) tests/sim/soak.py --hours $(SOAK_HOURS) --start $(SOAK_START)

bench: $(STAMP)
	$(PY) bench/registry_http.py

clean:
	rm -rf $(VENV) data *.egg-info
