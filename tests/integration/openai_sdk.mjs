// Drives a running saserve through the official `openai` SDK and checks the
// parsed values.  Usage: node openai_sdk.mjs BASE_URL API_KEY
// Prints one line per check and ends with "N passed, N failed".
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });
let passed = 0, failed = 0;

function check(name, cond, detail = "") {
  if (cond) { passed++; console.log(`ok   ${name}`); }
  else { failed++; console.log(`FAIL ${name} ${detail}`); }
}

async function run(name, fn) {
  try { await fn(); } catch (e) { failed++; console.log(`FAIL ${name}: ${e?.constructor?.name} ${e?.message}`); }
}

const prompt = "The kernel provides a simple interface for";
let greedy = "";

await run("models", async () => {
  const list = await client.models.list();
  const m = list.data[0];
  check("models.list returns the served model", list.data.length === 1 && typeof m.id === "string" && m.object === "model");
  check("model has shared_attention", m.shared_attention && Array.isArray(m.shared_attention.layer_source));
});

await run("completion", async () => {
  const r = await client.completions.create({ model: "x", prompt, max_tokens: 24, temperature: 0 });
  greedy = r.choices[0].text;
  check("completion object", r.object === "text_completion" && r.id.startsWith("cmpl-"));
  check("completion text", typeof greedy === "string" && greedy.length > 0);
  check("completion finish_reason", ["length", "stop"].includes(r.choices[0].finish_reason));
  check("completion usage", r.usage.prompt_tokens === 8 && r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens
        && r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 24, JSON.stringify(r.usage));
});

await run("completion stream", async () => {
  const stream = await client.completions.create({ model: "x", prompt, max_tokens: 24, temperature: 0, stream: true,
                                                   stream_options: { include_usage: true } });
  let text = "", chunks = 0, finish = null, usage = null, emptyChoicesLast = false;
  for await (const c of stream) {
    chunks++;
    if (c.usage) { usage = c.usage; emptyChoicesLast = c.choices.length === 0; }
    for (const ch of c.choices) { text += ch.text; if (ch.finish_reason) finish = ch.finish_reason; }
  }
  check("stream text equals non-stream text", text === greedy, JSON.stringify([text, greedy]));
  check("stream chunks", chunks > 3, String(chunks));
  check("stream finish_reason", finish === "length" || finish === "stop");
  check("stream include_usage chunk", usage && emptyChoicesLast && usage.completion_tokens >= 1);
});

await run("chat", async () => {
  const r = await client.chat.completions.create({ model: "x", messages: [
    { role: "system", content: "You are terse." }, { role: "user", content: "Say hello." }], max_tokens: 12, temperature: 0 });
  check("chat object", r.object === "chat.completion" && r.id.startsWith("chatcmpl-"));
  check("chat message", r.choices[0].message.role === "assistant" && typeof r.choices[0].message.content === "string");
  const s = await client.chat.completions.create({ model: "x", messages: [{ role: "system", content: "You are terse." },
    { role: "user", content: "Say hello." }], max_tokens: 12, temperature: 0, stream: true });
  let first = null, text = "", finish = null;
  for await (const c of s) {
    if (c.choices.length === 0) continue;
    const d = c.choices[0].delta;
    if (first === null) first = d;
    if (d.content) text += d.content;
    if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    check("chat chunk object", c.object === "chat.completion.chunk");
  }
  check("chat stream starts with a role delta", first && first.role === "assistant");
  check("chat stream text equals non-stream", text === r.choices[0].message.content, JSON.stringify([text, r.choices[0].message.content]));
  check("chat stream finish_reason", finish === r.choices[0].finish_reason);
});

await run("n=2", async () => {
  const r = await client.completions.create({ model: "x", prompt, max_tokens: 8, temperature: 1, seed: 7, n: 2 });
  check("n=2 choices", r.choices.length === 2 && r.choices[0].index === 0 && r.choices[1].index === 1);
  const again = await client.completions.create({ model: "x", prompt, max_tokens: 8, temperature: 1, seed: 7, n: 2 });
  check("same seed, same texts", again.choices[0].text === r.choices[0].text && again.choices[1].text === r.choices[1].text);
  const c = await client.chat.completions.create({ model: "x", messages: [{ role: "user", content: "Hi" }], max_tokens: 4, n: 2 });
  check("chat n=2", c.choices.length === 2);
});

await run("logprobs", async () => {
  const r = await client.completions.create({ model: "x", prompt, max_tokens: 6, temperature: 0, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  check("legacy logprobs arrays", lp.tokens.length === r.usage.completion_tokens && lp.token_logprobs.length === lp.tokens.length
        && lp.top_logprobs.length === lp.tokens.length && lp.text_offset.length === lp.tokens.length);
  check("legacy top_logprobs has 3 entries", Object.keys(lp.top_logprobs[0]).length === 3);
  check("legacy logprobs are <= 0", lp.token_logprobs.every((x) => x <= 0));
  check("greedy token is the top-1", Math.abs(Math.max(...Object.values(lp.top_logprobs[0])) - lp.token_logprobs[0]) < 1e-6);
  check("tokens join to the text", lp.tokens.join("") === r.choices[0].text, JSON.stringify([lp.tokens.join(""), r.choices[0].text]));
  const e = await client.completions.create({ model: "x", prompt: "You will be", max_tokens: 2, temperature: 0, logprobs: 1, echo: true });
  const el = e.choices[0].logprobs;
  check("echo text starts with the prompt", e.choices[0].text.startsWith("You will be"));
  check("echo logprobs cover the prompt", el.tokens.length === 4 + 2 && el.token_logprobs[0] === null);
  const c = await client.chat.completions.create({ model: "x", messages: [{ role: "user", content: "Hi" }], max_tokens: 4,
                                                   temperature: 0, logprobs: true, top_logprobs: 2 });
  const content = c.choices[0].logprobs.content;
  check("chat logprobs entries", content.length === c.usage.completion_tokens && content[0].top_logprobs.length === 2
        && Array.isArray(content[0].bytes) && typeof content[0].logprob === "number");
});

await run("stop", async () => {
  const words = greedy.trim().split(/\s+/);
  const stop = words.length > 2 ? " " + words[2] : "\n";
  const r = await client.completions.create({ model: "x", prompt, max_tokens: 24, temperature: 0, stop: [stop, "zzzz"] });
  check("stop string not in text", !r.choices[0].text.includes(stop) && greedy.startsWith(r.choices[0].text));
  check("stop finish_reason", r.choices[0].finish_reason === "stop");
  const s = await client.completions.create({ model: "x", prompt, max_tokens: 24, temperature: 0, stop, stream: true });
  let text = "";
  for await (const c of s) for (const ch of c.choices) text += ch.text;
  check("streamed stop", text === r.choices[0].text, JSON.stringify([text, r.choices[0].text]));
});

await run("errors", async () => {
  try {
    await client.completions.create({ model: "x", prompt, temperature: 7 });
    check("400 raises BadRequestError", false, "no error");
  } catch (e) {
    check("400 raises BadRequestError", e instanceof OpenAI.BadRequestError && e.status === 400, e?.constructor?.name);
    check("400 names the param", e.param === "temperature" || e.error?.param === "temperature", JSON.stringify(e.error));
  }
  const bad = new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 });
  try {
    await bad.completions.create({ model: "x", prompt, max_tokens: 1 });
    check("wrong key raises AuthenticationError", false, "no error");
  } catch (e) {
    check("wrong key raises AuthenticationError", e instanceof OpenAI.AuthenticationError && e.status === 401, e?.constructor?.name);
  }
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
