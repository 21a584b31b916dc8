#!/usr/bin/env bash
# tests/bench/run.sh - what `make bench` runs (QUICK=1: a fast subset).
#
#   tests/bench/run.sh build/saserve
#
# Measures, then prints one table (tests/bench/report.mjs):
#   1. the machine's ceilings: memory read bandwidth and OpenBLAS sgemm
#      (with the core saserve runs, OpenBLAS's own pick, and Prescott);
#   2. saserve bench on sa-tiny-sa q8_0 (bundled), sa-tiny f16 (from
#      $SASERVE_SHARED, default ../shared, when present) and a generated
#      Llama-shaped 1B q8_0 (build/bench/, made on first use);
#   3. llama.cpp on the same files (node-llama-cpp's prebuilt CPU build,
#      pinned in tests/bench/package.json), decode also with one thread
#      fewer;
#   4. a load test of `saserve serve` (1/4/16/64 streaming clients);
#   5. how many sequences a fixed KV pool holds with and without sharing.
# Raw results (JSON lines) go to build/bench/results.jsonl, the table also to
# build/bench/report.txt.
#
# Environment: QUICK=1, BENCH_THREADS (default: online CPUs), BENCH_REPS
# (default 5), BENCH_MAX_SECONDS (per figure, default 30: a figure whose runs
# take longer gets fewer runs, and the table says so), BENCH_1B_F16=1 (also
# the 1B model in f16, 2 GB more disk), SASERVE_SHARED.
set -u
BIN=${1:-build/saserve}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
QUICK=${QUICK:-0}
[ "$QUICK" = 0 ] || QUICK=1
THREADS=${BENCH_THREADS:-$(nproc 2>/dev/null || echo 1)}
REPS=${BENCH_REPS:-5}
MAXS=${BENCH_MAX_SECONDS:-30}
SHARED_DIR=${SASERVE_SHARED:-../shared}
OUT=build/bench
RES=$OUT/results.jsonl
TOOLS=$(dirname "$BIN")/tools
mkdir -p "$OUT"
: >"$RES"
T0=$(date +%s)

log() { echo "bench: [$(($(date +%s) - T0))s] $*" >&2; }
# Appends JSON lines from stdin to the results, each tagged with kind/label.
tag() { sed -n "s/^{/{\"kind\":\"$1\",\"label\":\"$2\",/p" >>"$RES"; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }
meta() { echo "{\"kind\":\"meta\",\"label\":\"$1\",\"value\":\"$2\"}" >>"$RES"; }

meta quick "$QUICK"
meta threads "$THREADS"
meta reps "$REPS"
meta max_seconds "$MAXS"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"//g')"
meta load_start "$(loadavg)"
log "threads $THREADS, $REPS runs per figure (at most ${MAXS}s each), QUICK=$QUICK, load average $(loadavg)"

# ---- 1. ceilings ------------------------------------------------------------
log "machine ceilings (memory bandwidth, sgemm)"
"$BIN" bench --ceilings --threads "$THREADS" --json 2>/dev/null | tag ceilings machine

# ---- llama.cpp through node-llama-cpp (bench-only) ---------------------------
LLAMA=1
LLAMA_WHY=""
if ! command -v node >/dev/null; then
    LLAMA=0
    LLAMA_WHY="node is not installed"
elif [ ! -f tests/bench/node_modules/node-llama-cpp/package.json ]; then
    if command -v npm >/dev/null; then
        log "installing node-llama-cpp (pinned, tests/bench only)"
        # Prebuilt linux-x64 CPU binaries only: no CUDA/Vulkan packages, no
        # download or source build in the postinstall step.
        (cd tests/bench && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --omit=optional --no-audit --no-fund \
            --loglevel=error >&2) || true
    fi
    if [ ! -f tests/bench/node_modules/node-llama-cpp/package.json ]; then
        LLAMA=0
        LLAMA_WHY="node-llama-cpp is not installed (npm ci in tests/bench failed or npm is missing)"
    fi
fi
[ $LLAMA = 1 ] || echo "{\"kind\":\"llama\",\"label\":\"all\",\"unavailable\":\"$LLAMA_WHY\"}" >>"$RES"

# saserve and llama.cpp on one file.
#   run_model LABEL FILE SHARED_LIST DEPTHS_B1 DEPTHS_B16 GEN_B1 GEN_B16
run_model() {
    local label=$1 file=$2 shared=$3 depths=$4 d16=$5 g1=$6 g16=$7
    log "$label: saserve ($file)"
    "$BIN" bench -m "$file" -t "$THREADS" -r "$REPS" --max-seconds "$MAXS" --shared-layers "$shared" \
        -p 512 -n "$g1" -d "$depths" -B 1 --json 2>/dev/null | tag saserve "$label"
    "$BIN" bench -m "$file" -t "$THREADS" -r "$REPS" --max-seconds "$MAXS" --shared-layers "$shared" \
        -p 0 -n "$g16" -d "$d16" -B 16 --json 2>/dev/null | tag saserve "$label"
    if [ $LLAMA = 1 ]; then
        log "$label: llama.cpp"
        node tests/bench/llama_cpp_bench.mjs -m "$file" -t "$THREADS" -r "$REPS" --max-seconds "$MAXS" \
            -p 512 -n "$g1" -d "$depths" -B 1 2>/dev/null | tag llama "$label"
        node tests/bench/llama_cpp_bench.mjs -m "$file" -t "$THREADS" -r "$REPS" --max-seconds "$MAXS" \
            -p 0 -n "$g16" -d "$d16" -B 16 2>/dev/null | tag llama "$label"
        # Decode once more with a core left for node's own thread: when
        # llama.cpp's threads spin on every core, node-llama-cpp's per-token
        # hand-off waits for a time slice.  The table compares with the
        # better of the two.
        if [ "$THREADS" -gt 1 ]; then
            log "$label: llama.cpp decode with $((THREADS - 1)) threads"
            node tests/bench/llama_cpp_bench.mjs -m "$file" -t $((THREADS - 1)) -r "$REPS" --max-seconds "$MAXS" \
                -p 0 -n "$g1" -d "$depths" -B 1 2>/dev/null | tag llama "$label"
            node tests/bench/llama_cpp_bench.mjs -m "$file" -t $((THREADS - 1)) -r "$REPS" --max-seconds "$MAXS" \
                -p 0 -n "$g16" -d "$d16" -B 16 2>/dev/null | tag llama "$label"
        fi
    fi
}

# ---- 2./3. models --------------------------------------------------------------
if [ $QUICK = 1 ]; then
    run_model sa-tiny-sa models/sa-tiny-sa-q8_0.gguf model/none 0 0 128 32
else
    # Batch 1 at three depths, batch 16 at the two ends.
    run_model sa-tiny-sa models/sa-tiny-sa-q8_0.gguf model/none 0,512,1000 0,1000 128 32
    if [ -f "$SHARED_DIR/models/sa-tiny/model-f16.gguf" ]; then
        run_model sa-tiny "$SHARED_DIR/models/sa-tiny/model-f16.gguf" "none/5-7,9-11" 0,512,1000 0,1000 128 32
    else
        meta skipped "sa-tiny f16: $SHARED_DIR/models/sa-tiny/model-f16.gguf not found"
    fi
    # The generated 1B model: ~1.1 GB (q8_0), ~0.6 GB (q4_k_m: Q4_K with
    # Q6_K where llama.cpp's Q4_K_M puts it), ~2.1 GB (f16).
    types="q8_0 q4_k_m"
    [ "${BENCH_1B_F16:-0}" = 1 ] && types="q8_0 q4_k_m f16"
    for ty in $types; do
        f=$OUT/llama-1b-$ty.gguf
        if [ ! -f "$f" ]; then
            need_mb=$(case $ty in f16) echo 2300 ;; q8_0) echo 1200 ;; *) echo 700 ;; esac)
            free_mb=$(df -Pm "$OUT" | awk 'NR==2 {print $4}')
            if [ "${free_mb:-0}" -lt $((need_mb + 1024)) ]; then
                meta skipped "1B $ty: ${free_mb} MiB free on $OUT, need $((need_mb + 1024))"
                continue
            fi
            log "generating $f (once; random weights)"
            "$TOOLS/gen_model" --preset 1b --type "$ty" -o "$f" >&2 || continue
        fi
        # Decode of 1B is slow on a small machine: 32 tokens per sequence at
        # batch 1, 16 at batch 16.
        run_model "1b-$ty" "$f" none 0 0 32 16
    done
fi

# ---- 4. load test ------------------------------------------------------------------
# A free loopback port: one nothing answers on.
free_port() {
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo $p; return; }
    done
    echo 0
}
SERVER_PID=""
start_server() { # args: extra serve flags
    PORT=$(free_port)
    "$BIN" serve --model models/sa-tiny-sa-q8_0.gguf --host 127.0.0.1 --port "$PORT" --threads "$THREADS" \
        --log-level warn "$@" >>"$OUT/serve.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        kill -0 $SERVER_PID 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
stop_server() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}
trap stop_server EXIT
: >"$OUT/serve.log"

if start_server; then
    if [ $QUICK = 1 ]; then plan="1:2 16:1"; else plan="1:2 4:2 16:1 64:1"; fi
    for cr in $plan; do
        c=${cr%:*} r=${cr#*:}
        log "load test: $c clients x $r requests (128-token prompts, 128 tokens each)"
        "$TOOLS/loadgen" --port "$PORT" --clients "$c" --requests "$r" --prompt-tokens 128 --max-tokens 128 |
            tag load "serve"
    done
    stop_server
else
    meta skipped "load test: saserve serve did not start (see $OUT/serve.log)"
    stop_server
fi

# ---- 5. sequences a fixed KV pool holds ----------------------------------------
log "max concurrency at --kv-cache-bytes 8M"
"$BIN" bench -m models/sa-tiny-sa-q8_0.gguf --max-concurrency --kv-cache-bytes 8M -p 128 -n 128 \
    --shared-layers none/model -t "$THREADS" --json 2>/dev/null | tag maxconc engine
# The same seen from the server: many long requests, the largest
# saserve_num_requests_running and KV usage in /metrics.
for sl in none 4-11; do
    if start_server --kv-cache-bytes 8M --max-running 256 --max-queue 256 --shared-layers "$sl"; then
        "$TOOLS/loadgen" --port "$PORT" --clients 32 --requests 1 --prompt-tokens 128 --max-tokens 128 \
            --poll-metrics | sed "s/^{/{\"shared_layers\":\"$sl\",/" | tag maxconc server
        stop_server
    fi
done

meta load_end "$(loadavg)"
meta seconds "$(($(date +%s) - T0))"
if command -v node >/dev/null; then
    node tests/bench/report.mjs "$RES" | tee "$OUT/report.txt"
else
    echo "node is not installed: raw results in $RES"
    cat "$RES"
fi
