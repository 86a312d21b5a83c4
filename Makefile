# The two commands a newcomer runs on a fresh Debian 12 machine: `make demo` and `make test`.
# Both create .venv, install the Python packages and (as root) the Debian packages the tests need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := openssl mosquitto mosquitto-clients tinyproxy faketime softhsm2 systemd procps strace
# The Debian package (make deb) and its test: build, lint, and a Debian 12 root to install it into.
DEB_PACKAGES += build-essential dpkg-dev debhelper python3.11 python3-pip ca-certificates lintian debootstrap

.PHONY: demo test lint typecheck unit integration bench deps clean deb

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[emulator,pkcs11,test]'
	touch $(STAMP)

deps: $(STAMP)
	@bash scripts/install-debian-packages.sh $(DEB_PACKAGES)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: deps
	$(BIN)/ruff check fleetprov tests benchmarks scripts
	$(BIN)/ruff format --check fleetprov tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15  # the slowest, to keep make test short

# The Debian package, with dpkg-buildpackage, in build/deb (packaging/README.md); needs no venv.
deb:
	@bash scripts/install-debian-packages.sh build-essential dpkg-dev debhelper python3.11 python3-pip ca-certificates
	bash scripts/build-deb.sh build/deb

bench: $(STAMP)
	$(BIN)/python benchmarks/emulator_throughput.py
	$(BIN)/python benchmarks/provision_latency.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info
