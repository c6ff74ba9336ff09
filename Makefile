# Set-up and the two jobs of the README. Every target sets up first (idempotent, seconds once done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test test-slow benchmark

setup:
	@bash scripts/setup.sh

# The main job: set up, then train MS-MLP on the embedded default classification data.
train: setup
	$(VENV)/bin/msmlp fit --task cls

# Tests run in TEST_WORKERS pytest-xdist processes (0: in pytest's own): many train on one thread
# (the det and seg defaults), so two keep a 2-core machine busy.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# Fast tests (seconds to a few minutes).
test: setup
	$(PYTEST)

# The real training runs on the embedded defaults (cls, det, seg); .ci/run runs them too.
test-slow: setup
	$(PYTEST) -m slow

benchmark: setup
	$(VENV)/bin/msmlp benchmark --model msmlp_tiny --batch-size 16 --img-size 224 --compare convnext_tiny swin_tiny
