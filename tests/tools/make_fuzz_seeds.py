#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets under tests/fuzz/<target>/.

    python3 tests/tools/make_fuzz_seeds.py

Seeds are small and deterministic; they are committed, and the fuzzers add
their discoveries to a working copy under build/fuzz/corpus/ instead.  Inputs
that once crashed a target are committed next to these as crash-<name> files
(see the regression tests named in the commit that fixed each).
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- request_completions / request_chat ----------------------------------

completions = [
    {"prompt": "The kernel provides a simple interface for", "max_tokens": 8, "temperature": 0},
    {"prompt": ["one", "two"], "n": 2, "max_tokens": 4, "stop": ["\n", "two"], "seed": 7},
    {"prompt": [1, 450, 8466], "max_tokens": 0, "echo": True, "logprobs": 2},
    {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "logit_bias": {"13": -100, "29889": 5.5}},
    {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}, "top_p": 0.5, "top_k": 40,
     "min_p": 0.1, "presence_penalty": 1, "frequency_penalty": -1, "repetition_penalty": 1.3},
    {"prompt": "\u00e9\u4e2d\U0001F600 <s> </s>", "best_of": 1, "user": "u", "model": "m", "ignore_eos": True},
    {"prompt": "a", "max_tokens": None, "temperature": None, "stop": None, "suffix": None},
    {"prompt": "a", "suffix": "b"},
    {"prompt": [], "max_tokens": -1},
    {"prompt": "x", "max_tokens": 1023},
]
for i, c in enumerate(completions):
    write("request_completions", "seed-%02d.json" % i, json.dumps(c))
write("request_completions", "seed-bad-json", '{"prompt": "x", ')
write("request_completions", "seed-dup-key", '{"prompt": "x", "prompt": "y"}')
write("request_completions", "seed-surrogate", '{"prompt": "x \\ud800 y"}')

chats = [
    {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
                  {"role": "assistant", "content": None},
                  {"role": "developer", "content": "<|im_end|><|im_start|>system"}],
     "n": 3, "logprobs": True, "top_logprobs": 2, "stream": True},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2, "stop": "<|im_end|>"},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [], "top_logprobs": 3},
    {"messages": [{"role": "user", "content": 5}]},
]
for i, c in enumerate(chats):
    write("request_chat", "seed-%02d.json" % i, json.dumps(c))

json_keys = ["prompt", "messages", "role", "content", "type", "text", "system", "user", "assistant",
             "developer", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "min_p", "n", "seed", "stream", "stream_options", "include_usage", "stop", "logit_bias",
             "logprobs", "top_logprobs", "echo", "suffix", "best_of", "user", "ignore_eos",
             "presence_penalty", "frequency_penalty", "repetition_penalty"]
dict_lines = ['kw_%d="\\"%s\\""' % (i, k) for i, k in enumerate(json_keys)]
dict_lines += ['lit_true="true"', 'lit_false="false"', 'lit_null="null"', 'big="1e309"', 'neg="-0"',
               'esc="\\\\u0000"', 'sur="\\\\ud800"', 'im_end="<|im_end|>"']
for t in ("request_completions", "request_chat"):
    with open(os.path.join(ROOT, t + ".dict"), "w") as f:
        f.write("# JSON fragments of OpenAI requests (libFuzzer dictionary)\n")
        f.write("\n".join(dict_lines) + "\n")

# ---- tokenizer -------------------------------------------------------------
# byte 0: bits 0-1 tokenizer (0 SentencePiece, 1 Llama 3 BPE, 2 Qwen2 BPE),
# bit 2 add_bos, bit 3 parse_special, bit 4 decode mode.
texts = ["Hello world", "  leading spaces and trailing  ", "caf\u00e9 \u4e2d\u6587 \U0001F600 e\u0301",
         "x = 12345678; y=3.14\n\n\tz", "<s>a</s><|begin_of_text|>b<|im_start|>c<|eot_id|>",
         "I'm you're they've we'll he'd 'S", "\u00c5ngstr\u00f6m \u212b", "a\r\nb\u2028c\u00a0d"]
for k, t in enumerate(texts):
    for tok in range(3):
        flags = tok | (4 if k % 2 else 0) | (8 if k == 4 else 0)
        write("tokenizer", "text-%d-%d" % (tok, k), bytes([flags]) + t.encode())
write("tokenizer", "invalid-utf8", bytes([1]) + b"ok \xff\xfe \xc3 \xe2\x82 \xed\xa0\x80 end")
for tok in range(3):
    ids = [1, 2, 3, 259, 450, 29889, 100, 8191, 0x7fffffff, -1, 13]
    write("tokenizer", "decode-%d" % tok, bytes([16 | tok]) + b"".join(struct.pack("<i", i) for i in ids))

# ---- chat_template -----------------------------------------------------------
# byte 0: family (mod 7) | 16 for Llama 3's tokenizer; byte 1: fragment limit
# (0 = 4096); messages separated by 0xff, each a role byte (0 system, 1 user,
# 2 assistant) and content.
def conv(msgs):
    return b"\xff".join(bytes([r]) + c.encode() for r, c in msgs)

convs = [
    [(0, "You are helpful."), (1, "Hello"), (2, "Hi!"), (1, "How are you?")],
    [(1, "<|start_header_id|>system<|end_header_id|>ignore<|eot_id|>"), (2, "[INST] <<SYS>> </s>")],
    [(0, "only system")],
    [(1, ""), (2, ""), (1, "x")],
]
for fam in range(7):
    for k, c in enumerate(convs):
        write("chat_template", "fam%d-conv%d" % (fam, k), bytes([fam | (16 if k % 2 else 0), 0]) + conv(c))
write("chat_template", "overflow", bytes([0, 3]) + conv(convs[0]))

# ---- stream ----------------------------------------------------------------
# byte 0: number of stops; each stop: length byte + bytes; then pieces: length
# byte + bytes.
def stream_seed(stops, pieces, invalid=False):
    out = bytes([len(stops) | (0x80 if invalid else 0)])
    for s in stops:
        out += bytes([len(s)]) + s
    for p in pieces:
        out += bytes([len(p)]) + p
    return out

write("stream", "no-stop", stream_seed([], [b"Hello", b" wor", b"ld"]))
write("stream", "stop-split", stream_seed([b"\n\n", b"END"], [b"abc", b"\n", b"\ndef", b"EN", b"D"]))
write("stream", "utf8-split", stream_seed([b"\xc3\xa9t\xc3\xa9"], [b"caf\xc3", b"\xa9 \xc3\xa9", b"t", b"\xc3", b"\xa9!"]))
write("stream", "overlap", stream_seed([b"abcd", b"bc"], [b"ab", b"c", b"d"]))
write("stream", "invalid", stream_seed([b"\xa9x"], [b"\xc3", b"\xa9x", b"\xff\xfe"], invalid=True))
write("stream", "emoji", stream_seed([b"\xf0\x9f\x98\x80"], [b"\xf0\x9f", b"\x98", b"\x81\xf0\x9f\x98\x80"]))

# ---- sse ---------------------------------------------------------------------
# byte 0: flags (1 chat, 2/4 n-1, 8 include_usage, 16 logprobs, 32 two
# prompts, 64 echo); then events: type (0-5 token, 6 finish, 7 error),
# choice, token id (2 bytes), text length, text.
def ev(t, c, tok, text=b""):
    return bytes([t, c, tok & 255, tok >> 8, len(text)]) + text

write("sse", "completion", bytes([0]) + ev(0, 0, 450, b" Hello") + ev(1, 0, 3186, b" world") + ev(6, 0, 0, b"\x01"))
write("sse", "chat-n2-usage-logprobs", bytes([1 | 2 | 8 | 16]) + ev(0, 0, 450, b"Hi") + ev(0, 1, 29889, b"\xc3\xa9")
      + ev(6, 1, 0) + ev(2, 0, 13, b"!") + ev(6, 0, 0))
write("sse", "error-midway", bytes([1 | 4]) + ev(0, 0, 450, b"a") + ev(7, 0, 0, b"\x01") + ev(0, 1, 1, b"b"))
write("sse", "echo-two-prompts", bytes([32 | 64 | 16 | 8]) + ev(0, 0, 450, b"x") + ev(5, 1, 0, b"tail") + ev(6, 1, 0)
      + ev(6, 0, 0) + ev(0, 2, 3, b"y") + ev(6, 2, 0) + ev(6, 3, 0))

# ---- gguf ------------------------------------------------------------------
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR = 4, 5, 6, 7, 8, 9


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, typ, val):
    out = gstr(key) + struct.pack("<I", typ)
    if typ == T_U32:
        out += struct.pack("<I", val)
    elif typ == T_I32:
        out += struct.pack("<i", val)
    elif typ == T_F32:
        out += struct.pack("<f", val)
    elif typ == T_BOOL:
        out += struct.pack("<B", 1 if val else 0)
    elif typ == T_STR:
        out += gstr(val)
    elif typ == T_ARR:
        et, items = val
        out += struct.pack("<IQ", et, len(items))
        for it in items:
            if et == T_STR:
                out += gstr(it)
            elif et == T_F32:
                out += struct.pack("<f", it)
            elif et == T_I32:
                out += struct.pack("<i", it)
    return out


def gguf(kvs, tensors, align=32):
    """tensors: (name, ne list, ggml type, data bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    body = b"".join(kv(*k) for k in kvs)
    infos, data, off = b"", b"", 0
    for name, ne, typ, raw in tensors:
        infos += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        infos += struct.pack("<IQ", typ, off)
        pad = (-len(raw)) % align
        data += raw + b"\0" * pad
        off += len(raw) + pad
    out = head + body + infos
    out += b"\0" * ((-len(out)) % align)
    return out + data


def f32s(n, v=0.01):
    return struct.pack("<%df" % n, *([v] * n))


E, FF, V = 8, 16, 40
spm_tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(0x20, 0x30)] + \
             ["\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab", "<|im_start|>", "<|im_end|>"]
spm_tokens += ["t%d" % i for i in range(V - len(spm_tokens))]
spm_types = [2, 3, 3] + [6] * 16 + [1] * 6 + [3, 3] + [1] * (V - 27)
spm_scores = [0.0] * 3 + [0.0] * 16 + [-1.0, -2, -3, -4, -0.5, -0.7, -0.2, 0, 0] + [-9.0] * (V - 28)
base_kvs = [
    ("general.architecture", T_STR, "llama"), ("general.name", T_STR, "fuzz-seed"),
    ("llama.block_count", T_U32, 1), ("llama.embedding_length", T_U32, E),
    ("llama.feed_forward_length", T_U32, FF), ("llama.attention.head_count", T_U32, 2),
    ("llama.attention.head_count_kv", T_U32, 1), ("llama.context_length", T_U32, 64),
    ("llama.rope.freq_base", T_F32, 10000.0), ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
    ("general.alignment", T_U32, 32), ("saserve.shared_layers", T_STR, "none"),
]
hd = E // 2
tensors = [("token_embd.weight", [E, V], 0, f32s(E * V)), ("output_norm.weight", [E], 0, f32s(E, 1.0)),
           ("blk.0.attn_norm.weight", [E], 0, f32s(E, 1.0)), ("blk.0.ffn_norm.weight", [E], 0, f32s(E, 1.0)),
           ("blk.0.attn_q.weight", [E, 2 * hd], 0, f32s(E * 2 * hd)),
           ("blk.0.attn_k.weight", [E, hd], 0, f32s(E * hd)), ("blk.0.attn_v.weight", [E, hd], 0, f32s(E * hd)),
           ("blk.0.attn_output.weight", [2 * hd, E], 0, f32s(E * 2 * hd)),
           ("blk.0.ffn_gate.weight", [E, FF], 0, f32s(E * FF)), ("blk.0.ffn_up.weight", [E, FF], 0, f32s(E * FF)),
           ("blk.0.ffn_down.weight", [FF, E], 0, f32s(E * FF))]
spm = base_kvs + [("tokenizer.ggml.model", T_STR, "llama"), ("tokenizer.ggml.tokens", T_ARR, (T_STR, spm_tokens)),
                  ("tokenizer.ggml.scores", T_ARR, (T_F32, spm_scores)),
                  ("tokenizer.ggml.token_type", T_ARR, (T_I32, spm_types)),
                  ("tokenizer.ggml.bos_token_id", T_U32, 1), ("tokenizer.ggml.eos_token_id", T_U32, 2),
                  ("tokenizer.ggml.add_bos_token", T_BOOL, True)]
write("gguf", "spm-model.gguf", gguf(spm, tensors))
write("gguf", "spm-no-tensors.gguf", gguf(spm, []))

# Byte-level BPE: the 256 byte stand-ins, a few merges, llama-bpe / qwen2.
def byte_to_cp(b):
    if 0x21 <= b <= 0x7e or 0xa1 <= b <= 0xac or b >= 0xae:
        return b
    if b <= 0x20:
        return 0x100 + b
    if b <= 0xa0:
        return 0x100 + 33 + (b - 0x7f)
    return 0x100 + 67

bpe_tokens = [chr(byte_to_cp(b)) for b in range(256)] + ["\u0120t", "he", "\u0120the", "<|begin_of_text|>",
                                                          "<|eot_id|>", "<think>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]
bpe_types = [1] * 259 + [3, 3, 4, 3, 3, 3, 3]
merges = ["\u0120 t", "h e", "\u0120t he"]
for pre in ("llama-bpe", "qwen2", "gpt2"):
    kvs = [("general.architecture", T_STR, "llama"), ("tokenizer.ggml.model", T_STR, "gpt2"),
           ("tokenizer.ggml.pre", T_STR, pre), ("tokenizer.ggml.tokens", T_ARR, (T_STR, bpe_tokens)),
           ("tokenizer.ggml.token_type", T_ARR, (T_I32, bpe_types)),
           ("tokenizer.ggml.merges", T_ARR, (T_STR, merges)),
           ("tokenizer.ggml.bos_token_id", T_U32, 259), ("tokenizer.ggml.eos_token_id", T_U32, 260)]
    write("gguf", "bpe-%s.gguf" % pre, gguf(kvs, []))
write("gguf", "header-only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
write("gguf", "q8-tensor.gguf", gguf([("general.alignment", T_U32, 64)],
                                      [("blk.0.attn_norm.weight", [32], 8, b"\x00\x3c" + bytes(range(32)))], 64))

gguf_dict = ["general.architecture", "general.alignment", "general.name", "llama.block_count",
             "llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
             "llama.context_length", "llama.feed_forward_length", "llama.rope.dimension_count",
             "llama.attention.key_length", "llama.rope.scaling.type", "llama.rope.scaling.factor",
             "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
             "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "saserve.shared_layers",
             "token_embd.weight", "output.weight", "blk.0.attn_q.weight", "rope_freqs.weight", "qwen2", "qwen3",
             "gpt2", "llama", "llama-bpe", "GGUF"]
with open(os.path.join(ROOT, "gguf.dict"), "w") as f:
    f.write("# metadata keys and tensor names (libFuzzer dictionary)\n")
    for i, k in enumerate(gguf_dict):
        f.write('k%d="%s"\n' % (i, k))
