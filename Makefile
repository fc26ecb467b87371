# IGRIS — `make run` and `make test` work on a fresh Debian 12 machine as root: missing
# Debian packages are installed first (apt-get update once, then apt-get install -y).
SHELL := /bin/bash
export PATH := $(PATH):/opt/swift/usr/bin

APT_PACKAGES := liburing-dev libsodium-dev libssl-dev openssl pkg-config util-linux iproute2 curl wget python3 python3-venv python3-requests python3-dnspython python3-socks haproxy
# promtool checks the /metrics output; it comes out of Debian's prometheus package without
# installing (and starting) the Prometheus server.
TOOLS := $(CURDIR)/.build/tools
SWIFT_BUILD_FLAGS ?=
# `make run` is a SOCKS5 gateway on 127.0.0.1:1080: no authentication (the bind is
# loopback-only), destinations as the default ACL allows (public addresses) plus one local
# demo server, 127.0.0.1:8000; metrics and health on 127.0.0.1:9100. Other setups, e.g.
#   make run RUN_ARGS="--socks5 0.0.0.0:1080 --users /etc/igris/users.yaml"
#   make run RUN_ARGS="--listen 0.0.0.0:443 --upstream 10.0.0.5:443"
RUN_ARGS ?= --socks5 127.0.0.1:1080 --no-auth --allow 127.0.0.1/32:8000 --admin 127.0.0.1:9100

.PHONY: all deps build build-debug build-allocation-probe run test soak test-asan test-tsan fuzz bench bench-quick microbench clean

all: build

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v swift >/dev/null || { echo "no swift on PATH: install a Swift 6.1+ toolchain (https://swift.org/install)"; exit 1; }

$(TOOLS)/bin/promtool:
	@mkdir -p $(TOOLS)/deb $(TOOLS)/bin
	@echo "fetching promtool (Debian's prometheus package, unpacked, not installed)"
	@cd $(TOOLS)/deb && rm -f prometheus_*.deb && apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
	@dpkg-deb -x $$(ls $(TOOLS)/deb/prometheus_*.deb | head -1) $(TOOLS)/root
	@ln -sf $(TOOLS)/root/usr/bin/promtool $(TOOLS)/bin/promtool

# kubernetes-validate (PyPI) checks deploy/kubernetes/ offline against the API schemas it
# bundles; it lives in a virtual environment of its own under .build/tools.
$(TOOLS)/venv/bin/kubernetes-validate: | deps
	@echo "installing kubernetes-validate (PyPI) into $(TOOLS)/venv"
	@python3 -m venv $(TOOLS)/venv && $(TOOLS)/venv/bin/pip install -q kubernetes-validate

build: deps
	swift build -c release $(SWIFT_BUILD_FLAGS)

build-debug: deps
	swift build --build-tests $(SWIFT_BUILD_FLAGS)

# The allocation test judges the release build (see Tests/IntegrationTests/AllocationTests.swift).
build-allocation-probe: deps
	swift build -c release --product igris-allocations $(SWIFT_BUILD_FLAGS)

run: build
	./.build/release/igris serve $(RUN_ARGS)

# The scale test holds 15,000 descriptors in the test process: raise the soft limit to the
# hard one. Tests share loopback ports and the fd budget, so they run one at a time.
test: build-debug build-allocation-probe $(TOOLS)/bin/promtool $(TOOLS)/venv/bin/kubernetes-validate
	@service haproxy stop >/dev/null 2>&1 || true  # the package starts one; tests run their own
	ulimit -n $$(ulimit -Hn) && PATH="$(TOOLS)/bin:$$PATH" swift test --skip-build --no-parallel --disable-xctest $(SWIFT_BUILD_FLAGS)

# The soak test alone, longer: each backend × copy/splice for SOAK_SECONDS (`make test` runs
# it for 3 s each).
SOAK_SECONDS ?= 60
soak: build-debug
	ulimit -n $$(ulimit -Hn) && IGRIS_SOAK_SECONDS=$(SOAK_SECONDS) swift test --skip-build --no-parallel --disable-xctest --filter SoakTests

# The same suite under AddressSanitizer / ThreadSanitizer, each in a build folder of its own.
# IGRIS_SANITIZED skips the malloc-counting test (the sanitizer owns malloc). Leak detection
# is off (test threads are detached by design); Tests/asan-suppressions.txt says why each
# suppression exists.
SANITIZED_TEST = ulimit -n $$(ulimit -Hn) && PATH="$(TOOLS)/bin:$$PATH"
test-asan: deps $(TOOLS)/bin/promtool
	swift build --build-tests --scratch-path .build-asan -Xswiftc -sanitize=address -Xcc -fsanitize=address -Xswiftc -DIGRIS_SANITIZED -Xcc -DIGRIS_SANITIZED
	$(SANITIZED_TEST) ASAN_OPTIONS=detect_leaks=0:suppressions=$(CURDIR)/Tests/asan-suppressions.txt swift test --skip-build --scratch-path .build-asan --no-parallel --disable-xctest

test-tsan: deps $(TOOLS)/bin/promtool
	swift build --build-tests --scratch-path .build-tsan -Xswiftc -sanitize=thread -Xcc -fsanitize=thread -Xswiftc -DIGRIS_SANITIZED -Xcc -DIGRIS_SANITIZED
	$(SANITIZED_TEST) TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" swift test --skip-build --scratch-path .build-tsan --no-parallel --disable-xctest

# libFuzzer on the SOCKS5, HTTP head, PROXY v1/v2 and config parsers and on the ACL's address
# classification (Fuzz/ is its own package), FUZZ_SECONDS each, from the committed seed
# corpus (new inputs go to Fuzz/.build/corpus; crashes to Fuzz/.build/crashes, and fail the run).
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := FuzzSocks5:socks5 FuzzSocks5UDP:socks5-udp FuzzHTTPHead:http-head FuzzProxyProtocol:proxy-protocol FuzzConfig:config FuzzAddress:address
fuzz: deps
	cd Fuzz && swift build -c release -Xswiftc -sanitize=fuzzer,address -Xswiftc -use-ld=lld
	@for t in $(FUZZ_TARGETS); do \
	  name=$${t%%:*}; corpus=$${t##*:}; \
	  mkdir -p Fuzz/.build/corpus/$$corpus Fuzz/.build/crashes; \
	  echo "== $$name, $(FUZZ_SECONDS) s"; \
	  Fuzz/.build/release/$$name -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=Fuzz/.build/crashes/$$name- Fuzz/.build/corpus/$$corpus Fuzz/Corpus/$$corpus 2>&1 \
	    | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|.*Done [0-9]+ runs)' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# End-to-end comparison with HAProxy, nginx stream, microsocks and dante (installed from apt
# when missing), written to Benchmarks/RESULTS.md and results.png, then the pressure section
# (Benchmarks/pressure.py: idle tunnels, slow readers, open-loop overload, busy connections):
# `make bench` (~20 min on 2 cores), `make bench-quick` (fewer targets, no pressure, < 3 min).
bench: build
	Benchmarks/bench.sh

bench-quick: build
	Benchmarks/bench.sh --quick

# package-benchmark microbenchmarks (Benchmarks/ is its own package: the first build fetches
# and compiles the benchmark framework, ~3 minutes on 2 cores). Fails if steady-state
# forwarding allocates (threshold: 0 mallocs per bridged round trip).
microbench: deps
	cd Benchmarks && ulimit -n $$(ulimit -Hn) && swift package --disable-sandbox benchmark --no-progress

clean:
	rm -rf .build .build-asan .build-tsan Benchmarks/.build Fuzz/.build
