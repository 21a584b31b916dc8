#!/usr/bin/env python3
"""Converts a small Hugging Face Llama / Qwen2 / Qwen3 checkpoint (config.json +
float32 model.safetensors) into a GGUF v3 file that saserve (and llama.cpp)
load.  Python standard library only.

It writes llama.cpp's metadata keys and tensor names, permutes the Q/K rows of
architecture `llama` so RoPE rotates adjacent pairs (as llama.cpp's converter
does), writes Llama 3 RoPE scaling as the rope_freqs.weight tensor, and copies
the tokenizer.* keys from a template GGUF (the checkpoint's vocabulary must
match it).

Usage: hf_to_gguf.py HF_DIR TEMPLATE.gguf OUT.gguf [--type f32|f16|q8_0]
"""
import argparse
import array
import json
import math
import struct
import sys

ALIGN = 32
T_F32, T_F16, T_Q8_0 = 0, 1, 8
V_U32, V_I32, V_F32, V_BOOL, V_STR, V_ARR, V_U64 = 4, 5, 6, 7, 8, 9, 10


# ---- reading --------------------------------------------------------------

def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        blob = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{name}: only F32 checkpoints are supported, got {info['dtype']}")
        a, b = info["data_offsets"]
        arr = array.array("f")
        arr.frombytes(blob[a:b])
        out[name] = (info["shape"], arr)
    return out


def read_template_kvs(path):
    """The raw bytes of every tokenizer.* key-value of a GGUF file."""
    m = open(path, "rb").read()
    pos = 4
    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, m, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def skip_value(t):
        nonlocal pos
        if t == V_STR:
            n = take("Q")  # (not `pos += take(...)`: take moves pos itself)
            pos += n
        elif t == V_ARR:
            et, n = take("I"), take("Q")
            if et == V_STR:
                for _ in range(n):
                    ln = take("Q")
                    pos += ln
            else:
                pos += sizes[et] * n
        else:
            pos += sizes[t]
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kvs = []
    for _ in range(n_kv):
        start = pos
        klen = take("Q")
        key = m[pos:pos + klen].decode()
        pos += klen
        t = take("I")
        skip_value(t)
        if key.startswith("tokenizer."):
            kvs.append(m[start:pos])
    return kvs


# ---- writing --------------------------------------------------------------

def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gstr(key) + struct.pack("<I", vtype)
    if vtype == V_STR:
        return out + gstr(value)
    fmt = {V_U32: "<I", V_I32: "<i", V_F32: "<f", V_BOOL: "<?", V_U64: "<Q"}[vtype]
    return out + struct.pack(fmt, value)


def f16_bytes(values):
    return struct.pack("<%de" % len(values), *values)


def q8_0_bytes(values):
    out = bytearray()
    for i in range(0, len(values), 32):
        blk = values[i:i + 32]
        amax = max(abs(v) for v in blk)
        d = amax / 127.0
        idv = 1.0 / d if d else 0.0
        qs = []
        for v in blk:
            x = v * idv
            q = int(math.copysign(math.floor(abs(x) + 0.5), x))  # roundf: half away from zero
            qs.append(max(-128, min(127, q)))
        out += struct.pack("<e", d) + struct.pack("<32b", *qs)
    return bytes(out)


def permute_rows(values, rows, cols, n_head):
    """llama.cpp's Q/K permutation: within each head, rows [a*hd/2 + b] go to
    [2b + a], so RoPE can rotate adjacent pairs."""
    hd = rows // n_head
    out = array.array("f", bytes(4 * rows * cols))
    for h in range(n_head):
        for a in range(2):
            for b in range(hd // 2):
                src = (h * hd + a * (hd // 2) + b) * cols
                dst = (h * hd + 2 * b + a) * cols
                out[dst:dst + cols] = values[src:src + cols]
    return out


def llama3_rope_factors(rp, head_dim):
    base = rp["rope_theta"]
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return array.array("f", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("template")
    ap.add_argument("out")
    ap.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    cfg = json.load(open(f"{args.hf_dir}/config.json"))
    w = read_safetensors(f"{args.hf_dir}/model.safetensors")
    mt = cfg["model_type"]
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[mt]
    H, G, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or D // H
    rp = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default"}
    mtype = {"f32": T_F32, "f16": T_F16, "q8_0": T_Q8_0}[args.type]

    tensors = []  # (name, shape [ne0, ne1...], type, bytes)
    def add(name, hf_name, permute_heads=0, matrix=True):
        shape, vals = w[hf_name]
        if permute_heads:
            vals = permute_rows(vals, shape[0], shape[1], permute_heads)
        ne = list(reversed(shape))
        t = mtype if matrix and len(shape) == 2 else T_F32
        if t == T_Q8_0 and ne[0] % 32:
            t = T_F16
        data = {T_F32: lambda v: v.tobytes(), T_F16: f16_bytes, T_Q8_0: q8_0_bytes}[t](vals)
        tensors.append((name, ne, t, data))

    add("token_embd.weight", "model.embed_tokens.weight")
    add("output_norm.weight", "model.norm.weight")
    if not cfg.get("tie_word_embeddings") and "lm_head.weight" in w:
        add("output.weight", "lm_head.weight")
    if rp.get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", [hd // 2], T_F32, llama3_rope_factors(rp, hd).tobytes()))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        perm = arch == "llama"
        add(b + "attn_norm.weight", p + "input_layernorm.weight")
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", H if perm else 0)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", G if perm else 0)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight")
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight")
        for s in ("q", "k", "v"):
            if p + f"self_attn.{s}_proj.bias" in w:
                add(b + f"attn_{s}.bias", p + f"self_attn.{s}_proj.bias", matrix=False)
        for s in ("q", "k"):
            if p + f"self_attn.{s}_norm.weight" in w:
                add(b + f"attn_{s}_norm.weight", p + f"self_attn.{s}_norm.weight", matrix=False)

    kvs = [kv("general.architecture", V_STR, arch), kv("general.name", V_STR, f"test-{arch}"),
           kv(f"{arch}.block_count", V_U32, cfg["num_hidden_layers"]),
           kv(f"{arch}.context_length", V_U32, cfg["max_position_embeddings"]),
           kv(f"{arch}.embedding_length", V_U32, D),
           kv(f"{arch}.feed_forward_length", V_U32, cfg["intermediate_size"]),
           kv(f"{arch}.attention.head_count", V_U32, H), kv(f"{arch}.attention.head_count_kv", V_U32, G),
           kv(f"{arch}.attention.key_length", V_U32, hd), kv(f"{arch}.attention.value_length", V_U32, hd),
           kv(f"{arch}.rope.dimension_count", V_U32, hd),
           kv(f"{arch}.rope.freq_base", V_F32, float(rp["rope_theta"])),
           kv(f"{arch}.attention.layer_norm_rms_epsilon", V_F32, float(cfg["rms_norm_eps"])),
           kv(f"{arch}.vocab_size", V_U32, cfg["vocab_size"]),
           kv("general.file_type", V_U32, {T_F32: 0, T_F16: 1, T_Q8_0: 7}[mtype]),
           kv("general.alignment", V_U32, ALIGN)] + read_template_kvs(args.template)

    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    infos, offset = b"", 0
    for name, ne, t, data in tensors:
        infos += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        infos += struct.pack("<IQ", t, offset)
        offset += (len(data) + ALIGN - 1) // ALIGN * ALIGN
    with open(args.out, "wb") as f:
        f.write(header + infos)
        f.write(b"\0" * ((-f.tell()) % ALIGN))
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * ((-len(data)) % ALIGN))


if __name__ == "__main__":
    main()
