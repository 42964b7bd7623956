# The two commands a new user needs are `make demo` and `make test`; each sets up what it needs.
VENV    ?= .venv
SANDBOX := $(VENV)/bin/sandbox
PYTEST  := $(VENV)/bin/pytest
# Docker-bound tests mostly wait on containers, so more workers than cores pays off.
TEST_WORKERS ?= 4

.PHONY: all demo test images docker venv lint format unit clean-runs bench bench-lifecycle bench-checkout bench-overheads bench-install bench-soak

all: test

venv:
	@scripts/ensure-venv

docker:
	@scripts/ensure-docker

images: venv docker
	$(SANDBOX) images build

demo: images
	$(SANDBOX) demo

# ruff for style and bugs, mypy for types ([tool.mypy]), lint-imports for the layer rules ([tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Rewrites files in place ([tool.ruff.format]).
format: venv
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

# Pure logic, no Docker: seconds. The tests mostly wait (timers, threads), so three workers beat two on two cores.
unit: venv
	$(PYTEST) -m "not docker" -q -n 3

# The serial tests restart the Docker engine, which stops every container on it: they run alone, afterwards.
test: lint images
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup --timeout 600 -q -m "not serial"
	$(PYTEST) -p no:xdist --timeout 600 -q -m serial

# Remove whatever a crashed run left behind (containers and networks labelled sandbox.run-id).
clean-runs: docker
	-docker ps -aq --filter label=sandbox.run-id | xargs -r docker rm -f
	-docker network ls -q --filter label=sandbox.run-id | xargs -r docker network rm

# The suite of issue 15: lifecycle, checkout, overheads and a small soak, one table of the headline figures
# (docs/performance.md; `make bench BENCH_ARGS=--write-docs` writes it there).
bench: images ; $(VENV)/bin/python bench/all.py $(BENCH_ARGS)
bench-lifecycle: images ; $(VENV)/bin/python bench/lifecycle.py --rounds 5
bench-checkout: venv ; $(VENV)/bin/python bench/checkout.py
bench-overheads: images ; $(VENV)/bin/python bench/overheads.py
bench-install: images ; $(VENV)/bin/python bench/install.py --rounds 3
bench-soak: images ; $(VENV)/bin/python bench/soak.py --sequential 100 --concurrent 10
