// llama_cpp_bench.mjs - the llama.cpp side of `make bench`: prompt-processing
// and decode tokens/s of a GGUF through node-llama-cpp's prebuilt llama.cpp
// (CPU build; bench-only, pinned in tests/bench/package.json, never a product
// dependency).
//
//   node tests/bench/llama_cpp_bench.mjs --model M.gguf [--prompt-tokens 512] [--gen-tokens 128]
//        [--depth 0,512] [--batch 1,16] [--threads 2] [--reps 5] [--max-seconds S]
//
// Prints one JSON object per (depth, batch) combination, measured as
// `saserve bench` measures: the same pseudo-random prompt ids (xorshift64 in
// [3, n_vocab), seed 1), a prompt of P tokens into an empty sequence,
// then B sequences holding D context tokens each decoding G tokens greedily
// (temperature 0, end-of-generation ignored) in shared llama_decode batches;
// medians over --reps runs after one warm-up.  When llama.cpp cannot be
// loaded it prints {"unavailable": "reason"} and exits 0.  --prompt-tokens 0
// skips the prefill figure; --max-seconds stops repeating a figure once its
// runs took that long (the output says how many runs each median has).
import { readFileSync } from "node:fs";

const args = { model: null, prompt: 512, gen: 128, depth: [0], batch: [1], threads: 2, reps: 5, batchSize: 512, maxSeconds: 0 };
for (let i = 2; i < process.argv.length; i++) {
    const a = process.argv[i], v = process.argv[i + 1];
    const list = () => v.split(",").map((x) => parseInt(x, 10));
    switch (a) {
        case "--model": case "-m": args.model = v; i++; break;
        case "--prompt-tokens": case "-p": args.prompt = parseInt(v, 10); i++; break;
        case "--gen-tokens": case "-n": args.gen = parseInt(v, 10); i++; break;
        case "--depth": case "-d": args.depth = list(); i++; break;
        case "--batch": case "-B": args.batch = list(); i++; break;
        case "--threads": case "-t": args.threads = parseInt(v, 10); i++; break;
        case "--reps": case "-r": args.reps = parseInt(v, 10); i++; break;
        case "--max-batch-tokens": args.batchSize = parseInt(v, 10); i++; break;
        case "--max-seconds": args.maxSeconds = parseFloat(v); i++; break;
        default:
            console.error(`llama_cpp_bench: unknown option ${a}`);
            process.exit(2);
    }
}
if (!args.model) {
    console.error("llama_cpp_bench: --model is required");
    process.exit(2);
}

function unavailable(reason) {
    console.log(JSON.stringify({ unavailable: String(reason).split("\n")[0].slice(0, 200) }));
    process.exit(0);
}

let nlc;
try {
    nlc = await import("node-llama-cpp");
} catch (e) {
    unavailable(`node-llama-cpp is not installed (npm ci in tests/bench): ${e.message}`);
}
let nlcVersion = "?";
try {
    const pj = new URL("./node_modules/node-llama-cpp/package.json", import.meta.url);
    nlcVersion = JSON.parse(readFileSync(pj, "utf8")).version;
} catch {}

let llama, model;
try {
    // build: "never": only the prebuilt binaries; never compile or download.
    llama = await nlc.getLlama({ gpu: false, build: "never", logLevel: "error", maxThreads: args.threads });
    model = await llama.loadModel({ modelPath: args.model });
} catch (e) {
    unavailable(e.message || e);
}

// Same ids as saserve bench's fill_ids(seed 1): xorshift64 (13, 7, 17).
function ids(n, nVocab, seed) {
    const M = (1n << 64n) - 1n;
    let x = (BigInt(seed) * 0x9e3779b97f4a7c15n + 0x2545f4914f6cdd1dn) & M;
    const out = new Array(n);
    for (let i = 0; i < n; i++) {
        x ^= (x << 13n) & M;
        x ^= x >> 7n;
        x ^= (x << 17n) & M;
        out[i] = 3 + Number(x % BigInt(nVocab - 3));
    }
    return out;
}

const median = (v) => {
    const s = [...v].sort((a, b) => a - b), n = s.length;
    return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
};
const now = () => Number(process.hrtime.bigint()) / 1e9;

const nVocab = model.fileInsights?.vocabularySize ?? model.tokens?.vocabularySize ?? 8192;
const maxDepth = Math.max(...args.depth), maxBatch = Math.max(...args.batch);
const ctxNeed = Math.max(args.prompt, maxDepth + args.gen + 1);
const prompt = ids(Math.max(args.prompt, maxDepth + maxBatch) + 1, nVocab, 1);

let context;
try {
    context = await model.createContext({
        contextSize: ctxNeed, // per sequence
        sequences: maxBatch,
        batchSize: args.batchSize,
        threads: { ideal: args.threads, min: args.threads },
    });
} catch (e) {
    unavailable(e.message || e);
}
const seqs = [];
for (let b = 0; b < maxBatch; b++) seqs.push(context.getSequence());

async function timePrefill(P) {
    const s = seqs[0];
    await s.clearHistory();
    const t0 = now();
    await s.evaluateWithoutGeneratingNewTokens(prompt.slice(0, P));
    const t = now() - t0;
    await s.clearHistory();
    return t;
}

async function timeDecode(D, G, B) {
    for (let b = 0; b < B; b++) {
        await seqs[b].clearHistory();
        if (D > 0) await seqs[b].evaluateWithoutGeneratingNewTokens(prompt.slice(0, D));
    }
    const gen = async (b) => {
        let n = 0;
        const first = prompt[(D + b) % prompt.length];
        for await (const tok of seqs[b].evaluate([first], { temperature: 0, yieldEogToken: true })) {
            void tok;
            if (++n >= G) break;
        }
    };
    const t0 = now();
    await Promise.all(Array.from({ length: B }, (_, b) => gen(b)));
    const t = now() - t0;
    for (let b = 0; b < B; b++) await seqs[b].clearHistory();
    return t;
}

// Up to --reps runs of f, fewer once they took --max-seconds.
async function repeat(f) {
    const t = [], t0 = now();
    while (t.length < args.reps) {
        t.push(await f());
        if (args.maxSeconds > 0 && now() - t0 > args.maxSeconds) break;
    }
    return t;
}

try {
    if (args.prompt > 0) await timePrefill(args.prompt); // warm-up
    await timeDecode(0, 4, maxBatch);
    const pp = args.prompt > 0 ? await repeat(() => timePrefill(args.prompt)) : [];
    const ppTokS = pp.length ? +(args.prompt / median(pp)).toFixed(3) : null;
    for (const D of args.depth)
        for (const B of args.batch) {
            const tg = await repeat(() => timeDecode(D, args.gen, B));
            console.log(JSON.stringify({
                engine: "llama.cpp",
                llama_cpp_release: llama.llamaCppRelease?.release ?? "?",
                node_llama_cpp: nlcVersion,
                build: llama.buildType,
                model: args.model.split("/").pop(),
                threads: context.currentThreads ?? args.threads,
                flash_attention: context.flashAttention,
                prompt_tokens: args.prompt,
                gen_tokens: args.gen,
                depth: D,
                batch: B,
                reps_prefill: pp.length,
                reps_decode: tg.length,
                prefill_tok_s: ppTokS,
                decode_tok_s: +((args.gen * B) / median(tg)).toFixed(3),
                peak_rss_bytes: process.resourceUsage().maxRSS * 1024,
            }));
        }
} catch (e) {
    unavailable(e.message || e);
}
await context.dispose();
await model.dispose();
await llama.dispose();
