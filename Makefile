VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint reliability bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway mock_accoil
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

reliability: $(STAMP)
	$(VENV)/bin/pytest -q -m slow tests/reliability

run: $(STAMP)
	$(PY) scripts/run_demo.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
