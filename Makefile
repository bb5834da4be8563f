# Two set-up commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local
# The shipped trained model (models/cmx-tiny-py/README.md); the default topology
# (topologies/local.yaml) serves its INT8 copy.
MODEL := models/cmx-tiny-py
CKPT_INT8 := $(RUN_DIR)/checkpoints/cmx-tiny-py-int8

.PHONY: install run test test-reliability protos clean image test-k8s-podman

install: $(STAMP)

# setuptools prints a generic notice on every editable install (folders named like a package may
# shadow it); it says nothing about this project, so the install filters that one message.
# torch is pinned to the CPU build that lies on disk; constraints.txt keeps every
# later resolution from replacing it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/cmx quantize --checkpoint $(MODEL) --out $(CKPT_INT8)
	$(VENV)/bin/cmx generate --local --checkpoint $(MODEL) --max-tokens 48 \
		"def read_config(path):"
	$(VENV)/bin/cmx up --topology topologies/local.yaml --run-dir $(RUN_DIR) \
		&& $(VENV)/bin/cmx demo --run-dir $(RUN_DIR); \
		status=$$?; $(VENV)/bin/cmx down --run-dir $(RUN_DIR); exit $$status

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# The full fault, overload, fuzz and security suite (docs/reliability.md); `make test` runs it
# with fewer fuzz examples.
RELIABILITY_TESTS := tests/test_reliability.py tests/test_fuzz.py tests/test_security.py tests/test_die_faults.py \
	tests/test_fabric_faults.py tests/test_kvcache_pool.py tests/test_supervisor.py tests/test_fabric_restart.py \
	tests/test_pool_faults.py
test-reliability: install
	CMX_FUZZ_EXAMPLES=200 $(PY) -m pytest -q -s -p no:cacheprovider $(RELIABILITY_TESTS)

# Opt-in, not in `make test` (docs/kubernetes-image.md): the Dockerfile's image built with podman on a
# Debian bookworm base made by mmdebstrap (as root it apt-installs podman and mmdebstrap when
# missing; about 2 min on 2 cores), and the dev overlay's pods run from it with `podman kube play`,
# answering the openai client through the gateway (about 40 s once the image exists).
image:
	bash scripts/image/build.sh

test-k8s-podman: install
	$(PY) scripts/image/podman_pods.py

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) runs
