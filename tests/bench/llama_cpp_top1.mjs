// llama_cpp_top1.mjs - llama.cpp's next-token prediction at every position
// of a text, for the agreement test of quantised files
// (tests/unit/test_kquants.c compares saserve's top-1 with it; `make
// llama-cpp-refs` writes its fixture).
//
//   node tests/bench/llama_cpp_top1.mjs --model M.gguf --text FILE [--tokens 512] > out.json
//
// The text is tokenized by llama.cpp (BOS first) and cut to --tokens ids;
// they are fed in one controlled evaluation, and for every position i the
// highest and second-highest logits of the prediction of token i+1 are
// recorded.  Then the same ids are fed again one at a time into a fresh
// sequence (llama.cpp computes single tokens with other kernels than
// batches), giving llama.cpp's agreement with itself: with int8-quantised
// activations, two computations that differ only in summation order round
// some activations differently, and on a small model that moves near-tied
// predictions.  Output: one JSON object {llama_cpp, model, model_fnv1a64,
// tokens, top1, top1_logit, top2_logit, top1_single}.  node-llama-cpp is the
// bench-only package pinned in tests/bench/package.json (npm ci there).
import { readFileSync } from "node:fs";
import { basename } from "node:path";

const args = { model: null, text: null, tokens: 512, threads: 2 };
for (let i = 2; i < process.argv.length; i++) {
    const a = process.argv[i], v = process.argv[++i];
    if (a === "--model") args.model = v;
    else if (a === "--text") args.text = v;
    else if (a === "--tokens") args.tokens = parseInt(v, 10);
    else if (a === "--threads") args.threads = parseInt(v, 10);
    else {
        console.error(`llama_cpp_top1: unknown option ${a}`);
        process.exit(2);
    }
}
if (!args.model || !args.text || !(args.tokens > 1)) {
    console.error("usage: llama_cpp_top1.mjs --model M.gguf --text FILE [--tokens N]");
    process.exit(2);
}

const nlc = await import("node-llama-cpp");
const version = JSON.parse(readFileSync(new URL("./node_modules/node-llama-cpp/package.json", import.meta.url), "utf8")).version;
const llama = await nlc.getLlama({ gpu: false, build: "never", logLevel: nlc.LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: args.model });
const ids = [model.tokens.bos, ...model.tokenize(readFileSync(args.text, "utf8"))].slice(0, args.tokens);
if (ids.length < args.tokens) {
    console.error(`llama_cpp_top1: the text has only ${ids.length} tokens`);
    process.exit(1);
}
const context = await model.createContext({ contextSize: Math.max(1024, args.tokens), batchSize: args.tokens, threads: args.threads, sequences: 2 });
const top2 = (r) => [...r.next.logits.entries()].sort((a, b) => b[1] - a[1]);
const ask = (t) => [t, { generateNext: { logits: { filter: { tokens: [], includeTop: 2 } } } }];
const res = await context.getSequence().controlledEvaluate(ids.map(ask));
const top1 = [], l1 = [], l2 = [], single = [];
for (let i = 0; i < ids.length; i++) {
    const lg = top2(res[i]);
    top1.push(lg[0][0]);
    l1.push(lg[0][1]);
    l2.push(lg[1][1]);
}
const seq = context.getSequence();
for (let i = 0; i < ids.length; i++) single.push(top2((await seq.controlledEvaluate([ask(ids[i])]))[0])[0][0]);
// FNV-1a 64 of the file: the test regenerates the model and checks it is this one.
let h = 0xcbf29ce484222325n;
const bytes = readFileSync(args.model);
for (let i = 0; i < bytes.length; i++) h = BigInt.asUintN(64, (h ^ BigInt(bytes[i])) * 0x100000001b3n);
console.log(JSON.stringify({ llama_cpp: `node-llama-cpp ${version}`, model: basename(args.model), model_fnv1a64: h.toString(16).padStart(16, "0"),
                             tokens: ids, top1, top1_logit: l1, top2_logit: l2, top1_single: single }));
await context.dispose();
await model.dispose();
await llama.dispose();
