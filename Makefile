# The two commands of the README: `make test` and `make demo` do all set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := $(sort $(wildcard packages/*))
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

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
