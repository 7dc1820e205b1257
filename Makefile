# The two commands a new user needs: `make demo` and `make test`. Each makes its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test test-fast fuzz lint bench schemas codex-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/.installed

## demo: embedded NATS, a real job run by the scripted agent, its result shown
demo: install
	BIN=$(BIN) bash scripts/demo.sh

## test: the whole test suite (and the linter), as CI runs it
test: install
	$(BIN)/ruff check numerusd numerusctl tests bench
	$(BIN)/python -m pytest -q

## test-fast: the tests not marked slow, in under a minute, for the edit-and-test loop (CI runs `make test`)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

## fuzz: tests/test_fuzz.py with 100k examples per property (FUZZ_EXAMPLES=n for another count); `make test` runs 400
fuzz: install
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),100000) $(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

lint: install
	$(BIN)/ruff check numerusd numerusctl tests bench
	$(BIN)/ruff format --check numerusd numerusctl tests bench

## bench: the benchmarks of docs/benchmarks.md, each a ratio against a baseline measured in the same run
bench: install
	$(BIN)/python bench/run_all.py --write docs/benchmarks.md

## schemas: regenerate schemas/*.json from the protocol types
schemas: install
	$(BIN)/python -m numerusd.schemas

## codex-check: a planned job run by the real `codex exec` (installed: CODEX_BIN or PATH) against a scripted model
codex-check: install
	$(BIN)/python scripts/codex_check.py

clean:
	rm -rf $(VENV) build *.egg-info
