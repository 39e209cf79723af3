# The two commands of the README: `make up` (a local cluster and a volume in use) and
# `make test` (everything CI runs). Both install what they need first.
.PHONY: install up down test lint unit integration contract bench

install:
	bash scripts/install.sh

up: install
	bash scripts/demo.sh

down:
	-.venv/bin/pxcluster volume unmount demo --state-dir .pxc-dev/host 2>/dev/null
	.venv/bin/pxcluster dev down

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	.venv/bin/pytest -q -m "not slow" tests
	@if [ -f ../shared/contract/check.sh ]; then bash ../shared/contract/check.sh .venv/bin/pxcluster; \
	else echo "../shared/contract/check.sh not found: contract check skipped"; fi

unit: install
	.venv/bin/pytest -q tests/unit

integration: install
	.venv/bin/pytest -q tests/integration

bench: install
	bench/run

# A randomized fault schedule in network namespaces (root): `make chaos SEED=N ROUNDS=N [MINUTES=M]`.
# Without SEED a random one is drawn; it is printed first, and again with any failure.
chaos: install
	CHAOS_SEED=$(SEED) CHAOS_ROUNDS=$(ROUNDS) CHAOS_MINUTES=$(MINUTES) .venv/bin/pytest -q -s -m slow tests/chaos/randomized.py
