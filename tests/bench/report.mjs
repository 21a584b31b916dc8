// report.mjs - prints the `make bench` table from build/bench/results.jsonl
// (written by tests/bench/run.sh).  Node standard library only.
//
// Ratios:
//   prefill x ceil  = flops the prompt tokens took / OpenBLAS sgemm rate
//                     (2 x matrix weights per token + causal attention)
//   decode x ceil   = bytes a decode step reads (weights once per step, plus
//                     each sequence's K/V) x steps/s / memory read bandwidth
//   x llama.cpp     = saserve tok/s / llama.cpp tok/s, same file, same shape
import { readFileSync } from "node:fs";

const file = process.argv[2] ?? "build/bench/results.jsonl";
const rows = readFileSync(file, "utf8")
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => {
        try {
            return JSON.parse(l);
        } catch {
            return null;
        }
    })
    .filter(Boolean);

const meta = {};
for (const r of rows) if (r.kind === "meta") (meta[r.label] ??= []).push(r.value);
const m1 = (k, d = "") => (meta[k] ? meta[k][0] : d);
const reps = +m1("reps", 5);
const ceil = rows.find((r) => r.kind === "ceilings") ?? {};
const sa = rows.filter((r) => r.kind === "saserve");
const ll = rows.filter((r) => r.kind === "llama" && !r.unavailable);
const llUnavail = rows.find((r) => r.kind === "llama" && r.unavailable);

const f1 = (x) => (x == null || Number.isNaN(x) ? "-" : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const ratio = (a, b) => (a == null || b == null || !b ? "-" : (a / b).toFixed(2));
const star = (n) => (n != null && n < reps ? `*${n}` : "");
let short = false, fewer = false;

function table(head, body, align) {
    const w = head.map((h, i) => Math.max(h.length, ...body.map((r) => String(r[i]).length)));
    const line = (cells) => "| " + cells.map((c, i) => (align[i] === "l" ? String(c).padEnd(w[i]) : String(c).padStart(w[i]))).join(" | ") + " |";
    console.log(line(head));
    console.log("|" + w.map((n, i) => (align[i] === "l" ? "-".repeat(n + 2) : "-".repeat(n + 1) + ":")).join("|") + "|");
    for (const r of body) console.log(line(r));
}

// ---- the table ----------------------------------------------------------------
const labels = [...new Set(sa.map((r) => r.label))];
const body = [];
for (const label of labels) {
    const mine = sa.filter((r) => r.label === label);
    const shares = [...new Set(mine.map((r) => r.shared_layers))];
    for (const sh of shares) {
        const group = mine.filter((r) => r.shared_layers === sh).sort((a, b) => a.batch - b.batch || a.depth - b.depth);
        let first = true;
        for (const r of group) {
            // llama.cpp: the best of its runs with this shape (threads T and T-1).
            const best = (xs, k) => xs.reduce((a, x) => (x[k] != null && (!a || x[k] > a[k]) ? x : a), null);
            const l = best(ll.filter((x) => x.label === label && x.depth === r.depth && x.batch === r.batch && x.gen_tokens === r.gen_tokens), "decode_tok_s");
            const pre = group.find((x) => x.prefill_tok_s != null);
            const lpre = best(ll.filter((x) => x.label === label), "prefill_tok_s");
            const thr = (x) => (x && x.threads !== r.threads ? ` (${x.threads}t)` : "");
            if (thr(l) || thr(lpre)) fewer = true;
            const showPre = first && pre;
            if (star(r.reps_decode) || (showPre && star(pre.reps_prefill))) short = true;
            body.push([
                label,
                r.weight_type,
                r.threads,
                sh,
                r.depth,
                r.batch,
                r.gen_tokens,
                showPre ? f1(pre.prefill_tok_s) + star(pre.reps_prefill) : "",
                showPre ? ratio(pre.prefill_gflop_s, ceil.sgemm_gflop_s) : "",
                showPre ? ratio(pre.prefill_tok_s, lpre?.prefill_tok_s) : "",
                f1(r.decode_tok_s) + star(r.reps_decode),
                ratio(r.decode_gb_s, ceil.bandwidth_gb_s),
                ratio(r.decode_tok_s, l?.decode_tok_s),
                (r.peak_rss_bytes / 2 ** 20).toFixed(0),
                showPre ? f1(lpre?.prefill_tok_s) + star(lpre?.reps_prefill) + thr(lpre) : "",
                l ? f1(l.decode_tok_s) + star(l.reps_decode) + thr(l) : "-",
            ]);
            first = false;
        }
    }
}
console.log();
console.log(`saserve bench: prompt 512 tokens; decode tg tokens per sequence after a context of depth; medians of ${reps} runs; threads ${m1("threads")}`);
console.log();
table(
    ["model", "type", "thr", "shared", "depth", "batch", "tg", "prefill t/s", "x ceil", "x llama", "decode t/s", "x ceil", "x llama", "RSS MiB", "llama pp t/s", "llama tg t/s"],
    body,
    ["l", "l", "r", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"],
);
if (short) console.log(`*N: median of N runs only (a figure stops repeating after ${m1("max_seconds")} s)`);
if (fewer)
    console.log(`(Nt): llama.cpp did better with N threads than with ${m1("threads")}: node-llama-cpp hands every token to node's ` +
        "own thread, which waits for a time slice while llama.cpp's threads spin on every core; x llama uses llama.cpp's better figure");
for (const s of meta.skipped ?? []) console.log(`skipped: ${s}`);

// ---- ceilings, llama.cpp --------------------------------------------------
console.log();
if (ceil.bandwidth_gb_s != null) {
    console.log(`ceilings (${ceil.threads} threads): memory read ${f1(ceil.bandwidth_gb_s)} GB/s (sum over ${ceil.bandwidth_bytes / 2 ** 30} GiB); ` +
        `sgemm ${ceil.sgemm_n}^3: ${f1(ceil.sgemm_gflop_s)} GFLOP/s with core ${ceil.sgemm_core} (as saserve runs), ` +
        `${f1(ceil.sgemm_native_gflop_s)} with ${ceil.sgemm_native_core} (OpenBLAS's own pick), ` +
        `${f1(ceil.sgemm_prescott_gflop_s)} with ${ceil.sgemm_prescott_core} (OPENBLAS_CORETYPE=Prescott, the fallback the core fix avoids): ` +
        `x${ratio(ceil.sgemm_gflop_s, ceil.sgemm_prescott_gflop_s)}`);
}
if (llUnavail) console.log(`llama.cpp: unavailable (${llUnavail.unavailable})`);
else if (ll.length) {
    const x = ll[0];
    console.log(`llama.cpp: node-llama-cpp ${x.node_llama_cpp}, llama.cpp ${x.llama_cpp_release} (${x.build} CPU build), flash attention ${x.flash_attention}, threads ${x.threads}`);
}
const llErr = rows.filter((r) => r.kind === "llama" && r.unavailable && r.label !== "all");
for (const r of llErr) console.log(`llama.cpp on ${r.label}: unavailable (${r.unavailable})`);

// ---- load test ----------------------------------------------------------------
const load = rows.filter((r) => r.kind === "load");
if (load.length) {
    console.log();
    console.log("saserve serve (bundled model, default settings), streaming /v1/completions, 128-token prompts, 128 tokens each:");
    table(
        ["clients", "requests", "gen tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"],
        load.map((r) => [r.clients, r.requests, f1(r.tok_s), f1(r.ttft_p50_ms), f1(r.ttft_p99_ms), f1(r.itl_p50_ms), f1(r.itl_p99_ms), r.errors + (r.timeouts ? `, ${r.timeouts} sent nothing for the loadgen timeout` : "") + (r.errors ? ` (${r.last_error})` : "")]),
        ["r", "r", "r", "r", "r", "r", "r", "l"],
    );
    const c1 = load.find((r) => r.clients === 1), c16 = load.find((r) => r.clients === 16);
    if (c1 && c16) console.log(`throughput 16 clients / 1 client: x${ratio(c16.tok_s, c1.tok_s)}`);
}

// ---- max concurrency ---------------------------------------------------------
const mc = rows.filter((r) => r.kind === "maxconc" && r.label === "engine");
if (mc.length) {
    console.log();
    const none = mc.find((r) => r.shared_layers === "none"), sh = mc.find((r) => r.shared_layers !== "none");
    for (const r of mc)
        console.log(`KV pool ${(r.kv_cache_bytes / 2 ** 20).toFixed(1)} MiB, shared ${r.shared_layers}: ${r.kv_bytes_per_token} bytes/token, ` +
            `${r.max_concurrent_seqs} sequences of ${r.seq_tokens} tokens at once`);
    if (none && sh)
        console.log(`sequences with sharing / without: x${ratio(sh.max_concurrent_seqs, none.max_concurrent_seqs)} ` +
            `(KV bytes per token without / with: x${ratio(none.kv_bytes_per_token, sh.kv_bytes_per_token)})`);
    for (const r of rows.filter((x) => x.kind === "maxconc" && x.label === "server"))
        console.log(`server, --kv-cache-bytes 8M, shared ${r.shared_layers}, 32 clients: at most ${r.max_running} requests running, ` +
            `KV usage up to ${(100 * r.max_kv_usage).toFixed(0)}%, ${r.ok} ok, ${r.errors} failed` +
            (r.timeouts ? `, ${r.timeouts} of them streams that stopped without ending` : "") + (r.errors ? ` (last: ${r.last_error})` : ""));
}

console.log();
console.log(`make bench took ${m1("seconds")} s (QUICK=${m1("quick")}); load average ${m1("load_start")} at the start, ${m1("load_end")} at the end, ` +
    `${m1("nproc")} CPUs (${m1("cpu")})`);
