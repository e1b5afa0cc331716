# csr: the two set-up commands of the README are `make demo` and `make test`;
# each installs what it needs into .venv first (pinned by constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := $(CURDIR)/examples/sample

# What `make demo` runs: CSR end to end on the built-in demo world, in ./csr-demo
# (a second run resumes there). `make sample-demo` walks through init + import +
# status on the bundled sample prompts instead.
DEMO = $(BIN)/csr demo

.PHONY: install demo sample-demo test check lint bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the requirements change.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(DEMO)

# init + import + status on the bundled sample (examples/sample) in a fresh
# directory: the store is an embedded SQLite file there.
sample-demo: install
	@dir=$$(mktemp -d "$${TMPDIR:-/tmp}/csr-sample-XXXXXX") && cd "$$dir" && echo "study directory: $$dir" \
	  && $(BIN)/csr init \
	  && $(BIN)/csr prompts import $(SAMPLE)/prompts.json --images $(SAMPLE)/images \
	  && $(BIN)/csr status

test: install
	$(BIN)/pytest -q

# The fast lane for a development loop: everything but the end-to-end tests
# marked slow (generation and training runs, kills, worker processes, demos),
# in WORKERS processes side by side (pytest-xdist; WORKERS=0: in this one).
WORKERS ?= 2
check: install
	$(BIN)/pytest -q -m "not slow" -n $(WORKERS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/bench_import.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
