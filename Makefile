# The inner loop. Every target uses the project's .venv, made (or brought up to date with
# pyproject.toml) by deploy/local/venv.sh first.
#   make check   ruff, import layers, mypy: seconds, no services
#   make unit    the unit tier: no services, no root, seconds
#   make test    the README's test command (services, stub images, every tier but swarm/deploy)
# Extra pytest arguments: make unit ARGS='-k relay -x'
.PHONY: check unit test venv

VENV := .venv
ARGS ?=

venv:
	@bash deploy/local/venv.sh

check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/python -m pytest -p no:cacheprovider tests/unit $(ARGS)

test:
	bash deploy/test.sh $(ARGS)
