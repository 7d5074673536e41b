# Thin wrapper over CMake. `make run` and `make test` install what is missing, build, then run.
BUILD      ?= build
BUILD_SAN  ?= build-sanitize
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=

BUILD_PKGS = build-essential cmake pkg-config libmicrohttpd-dev libcjson-dev \
             libcurl4-openssl-dev libhiredis-dev libcmocka-dev
TEST_PKGS  = python3 curl redis-server prometheus chromium
BENCH_PKGS = nginx-light wrk redis-server etcd-server

.PHONY: all deps test-deps bench-deps build build-sanitize run test test-sanitize bench cluster clean

all: build

# Install the Debian packages that are missing (through sudo when not root).
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(BUILD_PKGS))

test-deps: deps
	$(call apt_install,$(TEST_PKGS))

bench-deps: test-deps
	$(call apt_install,$(BENCH_PKGS))

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_ARGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

build-sanitize: deps
	cmake -S . -B $(BUILD_SAN) -DGW_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug $(CMAKE_ARGS) >/dev/null
	cmake --build $(BUILD_SAN) -j $(JOBS)

run: build
	@tests/upstream/demo.sh $(BUILD)

test: test-deps build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The same suite built with AddressSanitizer and UndefinedBehaviorSanitizer.
test-sanitize: test-deps build-sanitize
	cd $(BUILD_SAN) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j $(JOBS)

bench: bench-deps build
	bench/run.sh $(BUILD)
	bench/cluster.sh $(BUILD)
	bench/limits.sh $(BUILD)

# A 3-node cluster on loopback (etc/cluster/), until Ctrl-C.
cluster: build
	@etc/cluster/cluster.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD_SAN)
