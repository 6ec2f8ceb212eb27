# Two entry points for a fresh machine: `make bench` and `make test`. Both create .venv and
# install what they need (torch 2.14.1 comes from local disk on the dev machines).
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
TORCH     ?= torch==2.14.1
# The benchmark's table, progress bar and plots, and the examples' data set.
EXTRAS    := rich matplotlib scikit-learn
# The models fuse() is tested on (versions that install beside torch 2.14.1).
TEST_DEPS := torchvision==0.29.1 timm==1.0.31 transformers==5.24.0
export MAX_JOBS ?= 2
# nvcc on PATH may be a wrapper: point the build at the real toolkit when there is one.
export CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)

.PHONY: venv install cross test bench examples clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH)" numpy pytest expecttest ninja setuptools wheel \
		nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm $(EXTRAS)

venv: $(VPY)

# Editable install: ninja keeps its build folder, so a rebuild only compiles what changed.
install: $(VPY)
	$(VPY) -m pip install -q $(EXTRAS)
	$(VPY) -m pip install -q --no-build-isolation -e .

# The aarch64 compile check of the CPU sources (tests/test_cpu_levels.py) needs Debian's cross
# compiler; without root or apt the check says it is skipped (and fails under CI=true).
cross:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null; }; }; } || \
		echo "note: no aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)"

test: install cross
	$(VPY) -m pip install -q $(TEST_DEPS)
	$(VPY) -m pytest -q tests

# BENCH_ARGS="--quick" for a short run; --help lists the options.
bench: install
	$(VPY) -m fused_backprop.bench $(BENCH_ARGS)

examples: install
	$(VPY) -m pip install -q $(TEST_DEPS)
	$(VPY) examples/train_digits.py
	$(VPY) examples/vanishing_gradients.py
	$(VPY) examples/gradient_check.py
	$(VPY) examples/fuse_model.py

clean:
	rm -rf build *.egg-info fused_backprop/*.so
