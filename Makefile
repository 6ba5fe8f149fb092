VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run run-redis test lint install reliability bench clean

# the compiled parts (setup.py) are built by the editable install: an edit to one reinstalls
$(STAMP): pyproject.toml setup.py $(wildcard gateway/*.c)
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/ensure_cc.sh
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway mock_accoil tests scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests scripts

test: lint
	bash scripts/ensure_wrk.sh
	bash scripts/ensure_redis.sh
	bash scripts/ensure_browser.sh
	$(VENV)/bin/pytest -q

reliability: $(STAMP)
	bash scripts/ensure_redis.sh
	$(VENV)/bin/pytest -q -m slow tests/reliability tests/redis

bench: $(STAMP)
	bash scripts/ensure_wrk.sh
	$(PY) scripts/bench_ingest.py
	$(PY) scripts/bench_forward.py
	$(PY) scripts/bench_memory.py
	$(PY) scripts/bench_sustained.py

run: $(STAMP)
	$(PY) scripts/run_demo.py

run-redis: $(STAMP)
	bash scripts/ensure_redis.sh
	$(PY) scripts/run_demo.py --store redis

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache build gateway/_*.so
