# MyData Proxy: `make run` starts the proxy on the embedded default config
# (forward proxy on 127.0.0.1:9000); `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench check clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode keeps twisted/plugins visible to twistd in an editable install
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= mydataproxy $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
