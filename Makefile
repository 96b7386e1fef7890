# Two entry points (see README): `make demo` and `make test`; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN ?= runs/oracle
# Exact versions of every package, tested by CI; `make lock` renews it (a deliberate commit).
LOCK := constraints.txt

.PHONY: install demo test lint lock

install:
	# torch first, pinned: on CPU machines 2.13.0 is the CPU build; an unpinned torch
	# would pull a multi-GB CUDA build.
	$(PIP) install -q -c $(LOCK) torch==2.13.0
	$(PIP) install -q -c $(LOCK) -e ".[dev]"

demo: install
	PYTHON=$(PYTHON) bash launch/oracle_demo.sh $(RUN)

distill-demo: install
	PYTHON=$(PYTHON) bash launch/distill_demo.sh $(DISTILL_RUN)

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Resolve the newest versions pyproject.toml allows in a new virtual environment and
# write them to $(LOCK) (torch stays at the pinned CPU build).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Exact versions for 'make install' (pip -c); made by 'make lock' with $$(.lock-venv/bin/python --version)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -e 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK)
	rm -rf .lock-venv
