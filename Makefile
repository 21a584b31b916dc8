# saserve - an OpenAI-compatible inference server with Shared Attention.
#
#   make            build build/saserve
#   make run        build, then serve the bundled model on 127.0.0.1:8080
#   make test       unit + integration tests (Check); ends with Check's summary line
#   make bench      benchmarks, printed as figures and ratios
#   make SANITIZE=address,undefined test   the same under sanitizers (own build dir)
#
# Missing Debian packages are installed with apt-get when run as root;
# otherwise the exact command is printed.

CC       ?= cc
PKGS     := libmicrohttpd jansson openblas libuv check
DEB_PKGS := build-essential pkg-config libmicrohttpd-dev libjansson-dev libopenblas-dev libuv1-dev check
# Test-time tools: curl for the HTTP tests, node/npm for the OpenAI SDK test,
# prometheus for promtool and the scrape test.
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

.PHONY: all run test unit bench clean deps test-deps node-deps config-docs
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
test: deps test-deps node-deps $(BIN) $(TEST_BIN)
	@SASERVE_BIN=$(BIN) $(TEST_BIN)

# QUICK=1: a fast subset.  Tools: the model generator and the load generator.
bench: all $(BUILD)/tools/gen_model $(BUILD)/tools/loadgen
	@QUICK=$(QUICK) tests/bench/run.sh $(BIN)

clean:
	rm -rf build

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
