# Two commands set everything up on a fresh machine:
#   make demo   installs what is missing, generates the demo data, trains launch/specs/demo.yaml with DeepSpeed
#   make test   installs the test extras (and, apart, the original OpenFlamingo and llm-foundry's MPT) if missing, runs the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without GPUs DeepSpeed runs on the CPU (gloo) with 2 ranks; with GPUs it uses all of them.
GPUS := $(shell nvidia-smi -L 2>/dev/null | wc -l)
ifeq ($(GPUS),0)
  DS_ENV := DS_ACCELERATOR=cpu
  NUM_GPUS := 2
else
  DS_ENV :=
  NUM_GPUS := $(GPUS)
endif

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The original OpenFlamingo, released, for the side-by-side tests only: apart from the venv's packages, without its
# dependencies (it pins torch 2.0.1); tests/model/conftest.py reads it from there
ORIGINAL := $(VENV)/original
$(ORIGINAL)/.installed: | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(ORIGINAL) open-flamingo==2.0.1
	touch $@

# llm-foundry 0.1.0 (May 2023), the code MPT-7B's hub remote code was flattened from, for the side-by-side tests of
# the MPT-family LMs only: apart, without its dependencies (composer, ...); tests/model/reference_lms.py reads it there
REFERENCE := $(VENV)/reference
$(REFERENCE)/.installed: | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(REFERENCE) llm-foundry==0.1.0
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed $(ORIGINAL)/.installed $(REFERENCE)/.installed

# The rendezvous port of the demo's ranks: MASTER_PORT from the environment or the command line, else a free one
# (a fixed port fails with EADDRINUSE while another job on the machine holds it)
MASTER_PORT ?= $(shell $(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

demo: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH $(DS_ENV) $(BIN)/deepspeed --num_gpus $(NUM_GPUS) --master_port $(MASTER_PORT) launch/train.py \
	  --deepspeed_config ds_configs/zero2.json --spec launch/specs/demo.yaml $(ARGS)

test: install-test
	PATH=$(abspath $(BIN)):$$PATH OF_ORIGINAL_PACKAGE=$(abspath $(ORIGINAL)) \
	  OF_REFERENCE_PACKAGE=$(abspath $(REFERENCE)) $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs demo_data .pytest_cache
