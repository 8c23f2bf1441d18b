# textgen — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,serve,rayserve,dev
STAMP := $(VENV)/.installed
# `make run`: the Ray job on a local Ray (one worker, all cores) -> best checkpoint -> ONNX -> a sample.
# Its training budget is MINUTES (a few on a 2-core laptop). Train longer with e.g.
#   make run MINUTES=30
# Running it again with the same NAME continues the same run (Ray resumes from its last checkpoint;
# MINUTES counts the whole run).
MINUTES ?= 5
NAME ?= make-run
RUNS := $(CURDIR)/runs
JS_STAMP := js/node_modules/.installed
.PHONY: venv run lint test test-fast bench lock clean js browser

venv: $(STAMP)

# Reinstall when the dependency list or the pinned constraints change.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: $(STAMP)
	@echo "== training the default model for $(MINUTES) minutes on the bundled corpus (a Ray job: one worker, all cores)."
	@echo "== train longer with: make run MINUTES=30   (continues this run, $(RUNS)/$(NAME), up to 30 minutes in all)"
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m jobs.train --preset default --max-minutes $(MINUTES) \
		--storage-path $(RUNS) --name $(NAME)
	$(BIN)/textgen export $(RUNS)/$(NAME) --out $(RUNS)/$(NAME).onnx
	$(BIN)/textgen generate $(RUNS)/$(NAME).onnx --prompt "alice was beginning" --max-chars 600 \
		--temperature 0.8 --seed 0
	@echo; echo "== model: $(RUNS)/$(NAME).onnx  (short runs give rough text: make run MINUTES=30 trains it on)"
	@echo "== try: $(BIN)/textgen generate $(RUNS)/$(NAME).onnx --prompt 'the queen ' --temperature 0.7"
	@echo "==      $(BIN)/textgen serve $(RUNS)/$(NAME).onnx"

# Lint (pyflakes, pycodestyle errors, import order; settings in pyproject.toml), then the suite.
lint: $(STAMP)
	$(BIN)/ruff check .

# The JS generator's packages (tests/test_js.py runs `npm test`); onnxruntime-node's install script
# would download CUDA binaries, which the CPU backend does not need.
js: $(JS_STAMP)
$(JS_STAMP): js/package.json js/package-lock.json
	cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	touch $(JS_STAMP)

# The system browser the page tests drive through Playwright (Debian's chromium).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: lint js browser
	$(BIN)/python -m pytest tests

test-fast: lint js browser
	$(BIN)/python -m pytest tests -m "not slow"

# Benchmarks print JSON lines; figures and commands are recorded in bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.generation --model $(RUNS)/$(NAME).onnx

# Re-pin every transitive dependency after changing pyproject.toml (needs the package index).
lock:
	rm -rf /tmp/textgen-lock && $(PYTHON) -m venv /tmp/textgen-lock
	/tmp/textgen-lock/bin/pip install --quiet --upgrade pip
	/tmp/textgen-lock/bin/pip install --quiet -e ".[$(EXTRAS)]"
	/tmp/textgen-lock/bin/pip freeze --exclude-editable | grep -v '^textgen' > requirements/constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
