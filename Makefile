# textgen — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,serve,rayserve,dev
STAMP := $(VENV)/.installed
# Training budget of `make run`, in minutes (a few on a 2-core laptop). Train longer with e.g.
#   make run MINUTES=30
MINUTES ?= 5
OUT ?= runs/make-run

.PHONY: venv run test test-fast bench lock clean

venv: $(STAMP)

# Reinstall when the dependency list or the pinned constraints change.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/textgen train --preset default --max-minutes $(MINUTES) --out $(OUT) $$(test -d $(OUT)/last && echo --resume)

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench.train_throughput

# Re-pin every transitive dependency after changing pyproject.toml (needs the package index).
lock:
	rm -rf /tmp/textgen-lock && $(PYTHON) -m venv /tmp/textgen-lock
	/tmp/textgen-lock/bin/pip install --quiet --upgrade pip
	/tmp/textgen-lock/bin/pip install --quiet -e ".[$(EXTRAS)]"
	/tmp/textgen-lock/bin/pip freeze --exclude-editable | grep -v '^textgen' > requirements/constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
