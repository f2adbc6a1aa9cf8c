# The two commands of the README: `make test` and `make demo` do all set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Dependency order (models <- kernels <- runtime <- train, serve <- cli): older pips resolve editables in order.
PACKAGES := $(wildcard $(addprefix packages/,wan-models wan-kernels wan-runtime wan-train wan-serve wan-cli))
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when a package's metadata or the pins change.
$(STAMP): $(PY) constraints.txt $(wildcard packages/*/pyproject.toml)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt \
		$(foreach p,$(PACKAGES),-e "$(p)[test]")
	touch $(STAMP)

install: $(STAMP)

# tools/ensure_test_system.sh installs the browser and PostgreSQL 15 the serve tests use when missing (apt-get, root).
test: $(STAMP)
	bash tools/ensure_test_system.sh
	$(PY) -m pytest

# The embedded tiny-shapes model (wan_runtime/assets/tiny-shapes, docs/tiny_model.md): a real Wan 2.1
# architecture trained on procedural shape videos, generating a 64x64, 17-frame clip on a CPU in seconds.
demo: $(STAMP)
	$(VENV)/bin/wan generate --prompt "a red circle moving left on a white background" \
		--seed 0 --device cpu --dtype float32 --output out/demo.mp4

clean:
	rm -rf $(VENV) .cache out
