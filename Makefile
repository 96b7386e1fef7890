# Two entry points (see README): `make demo` and `make test`; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN ?= runs/oracle

.PHONY: install demo test lint bench

install:
	# torch first, pinned: on CPU machines 2.13.0 is the CPU build; an unpinned torch
	# would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# open_clip ships CLIP's BPE vocabulary; its own deps (torchvision, timm) are not needed.
	$(PIP) install -q --no-deps open_clip_torch==3.3.0
	$(PIP) install -q -e ".[dev]"

demo: install
	PYTHON=$(PYTHON) bash launch/oracle_demo.sh $(RUN)

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
