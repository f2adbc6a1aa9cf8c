# The two commands of the README: `make test` and `make demo` do all set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Dependency order (models <- kernels <- runtime <- train <- cli): older pips resolve editables in order.
PACKAGES := $(wildcard $(addprefix packages/,wan-models wan-kernels wan-runtime wan-train wan-cli))
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

# Until the embedded default model lands, the demo runs a tiny random model written on the fly
# (real architecture and file layout, random weights: the video is noise, the path is real).
DEMO_MODELS := .cache/demo-models
demo: $(STAMP)
	$(PY) -m wan_runtime.tiny_release $(DEMO_MODELS) Wan2.1-T2V-1.3B
	$(VENV)/bin/wan generate --model $(DEMO_MODELS)/Wan-AI/Wan2.1-T2V-1.3B \
		--prompt "a red circle moving left on a white background" \
		--height 64 --width 64 --frames 17 --steps 10 --seed 0 \
		--device cpu --dtype float32 --output out/demo.mp4

clean:
	rm -rf $(VENV) .cache out
