# The project's front door: every target creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# Test files run on both cores (pytest-xdist); each file stays in one worker so its module fixtures are built once.
PYTEST_WORKERS ?= 2
# tpu: libtpu, so the tests compile for TPU topologies (tests/test_aot_tpu.py); it stays idle on CPU hosts.
EXTRAS ?= media,torch,dev,tpu

.PHONY: install chromium demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The HTML report test renders pages in headless Chromium (Debian's package; needs root for apt-get).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make test needs Chromium for the report test: apt-get install chromium" >&2; exit 1; }

demo: install
	$(BIN)/python -m xemogpt_jax.demo

test: install chromium
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Every benchmark in bench/, one after another, at its default (small) settings.
BENCHMARKS := llm data train infer infer_memory emocue360

bench: install
	@set -e; for name in $(BENCHMARKS); do \
	  echo "== bench/$$name.py"; \
	  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m bench.$$name; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
