# Persona: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test lint format proto cassandra-start cassandra-stop bench bench-quick bench-deps clean \
	browser screenshots

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/persona demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# serving/persona_pb2.py and persona_pb2_grpc.py (checked in) from serving/persona.proto,
# with the grpcio-tools of the dev extra (its protoc matches the protobuf runtime pinned).
proto: install
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. serving/persona.proto

# Headless Chromium for the console's browser test (tests/test_console.py), from Debian's
# packages as the Cassandra jars come from Maven Central; nothing to do when it is there.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# Everything on a fresh machine: deps, Cassandra jars, Chromium, a running node, the suite.
# The node is stopped afterwards (even when tests fail) unless it was already running.
test: install browser
	$(BIN)/persona cassandra fetch
	$(BIN)/ruff check .
	@was_running=0; $(BIN)/persona cassandra status >/dev/null 2>&1 && was_running=1; \
	$(BIN)/persona cassandra start || exit 1; \
	$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$was_running = 0 ]; then $(BIN)/persona cassandra stop; fi; \
	exit $$status

# The README's pictures of /ui and /docs, taken by the browser test against `persona up`.
screenshots: install browser
	PERSONA_SCREENSHOTS=docs $(BIN)/pytest -p no:cacheprovider tests/test_console.py

cassandra-start: install
	$(BIN)/persona cassandra start

cassandra-stop: install
	$(BIN)/persona cassandra stop

# Benchmarks need wrk (a C load generator) and matplotlib for the scaling plot.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

bench-deps: $(VENV)/.bench-installed
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/persona cassandra fetch

bench: bench-deps
	$(BIN)/python -m bench.run_all

bench-quick: bench-deps
	$(BIN)/python -m bench.run_all --quick

clean:
	rm -rf $(VENV) .cache data .pytest_cache .ruff_cache .hypothesis
