PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-team test lint format bench mutate clean

# Installing says one line; pip's own output shows only on errors (-qq).
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@echo "Installing kprivacy_nb and its dependencies into $(VENV) (a few minutes, first run only) …"
	@$(BIN)/python -m pip install -qq -e '.[dev,browser]'
	@$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kprivacy_nb)" >/dev/null
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	@$(BIN)/python -m kprivacy_nb.demo

demo-team: $(STAMP)
	@$(BIN)/python -m kprivacy_nb.demo_team

mutate: $(STAMP)
	$(BIN)/python tools/mutate.py

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) demo-output .pytest_cache
