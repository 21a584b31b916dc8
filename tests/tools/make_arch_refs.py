#!/usr/bin/env python3
"""Reference forward passes for the architecture tests (run where PyTorch and
transformers are installed; a GPU is used when present).

For each architecture (a Llama-3-style Llama with llama3 RoPE scaling and tied
embeddings, Qwen2, Qwen3) it builds a small random model from a fixed seed,
writes its weights (float32 safetensors) and config, and records, computed in
float32 with TF32 off on weights rounded to float16 values:
  - the logits at the last position of a few prompts (token ids), and
  - 16 greedy tokens after each prompt, each from a full recompute (no cache),
    with the gap between the top two logits at every step.

Usage: make_arch_refs.py OUT_DIR
Outputs OUT_DIR/<name>/{config.json,model.safetensors} and OUT_DIR/<name>.json.
tests/tools/hf_to_gguf.py turns the weights into GGUF files.
"""
import json
import os
import random
import sys

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

VOCAB = 8192  # sa-tiny's tokenizer, so the GGUFs carry a real vocabulary


def models():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2)
    llama = LlamaConfig(**common, rms_norm_eps=1e-5, head_dim=32, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 256})
    qwen2 = Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    qwen3 = Qwen3Config(**common, rms_norm_eps=1e-6, head_dim=64, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    return [("llama3", LlamaForCausalLM, llama), ("qwen2", Qwen2ForCausalLM, qwen2), ("qwen3", Qwen3ForCausalLM, qwen3)]


def randomise(model, seed):
    """Weights large enough that the logits are far from uniform (greedy
    decoding then has clear winners), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5) * 1.5)
            # Values exactly representable in float16, so an F16 GGUF holds
            # the very weights the float32 reference ran with.
            p.copy_(p.half().float())


def main():
    out = sys.argv[1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rnd = random.Random(20261128)
    prompts = [[1], [1] + [rnd.randrange(3, VOCAB) for _ in range(6)], [1] + [rnd.randrange(3, VOCAB) for _ in range(32)],
               [1] + [rnd.randrange(3, VOCAB) for _ in range(99)]]
    for i, (name, cls, cfg) in enumerate(models()):
        torch.manual_seed(1000 + i)
        cfg._attn_implementation = "eager"
        model = cls(cfg).to(torch.float32)
        randomise(model, 2000 + i)
        model.eval().to(dev)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        ref = {"model": name, "config": cfg.to_dict(), "compute": f"float32, TF32 off, eager attention, {dev}",
               "transformers": __import__("transformers").__version__, "torch": torch.__version__, "prompts": []}
        with torch.no_grad():
            for ids in prompts:
                logits = model(torch.tensor([ids], device=dev)).logits[0, -1].float().cpu()
                seq, greedy, gaps = list(ids), [], []
                for _ in range(16):
                    lg = model(torch.tensor([seq], device=dev)).logits[0, -1].float().cpu()
                    top = torch.topk(lg, 2)
                    greedy.append(int(top.indices[0]))
                    gaps.append(float(top.values[0] - top.values[1]))
                    seq.append(greedy[-1])
                ref["prompts"].append({"ids": ids, "last_logits": [round(float(x), 6) for x in logits],
                                       "greedy_ids": greedy, "greedy_top2_gap": gaps})
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(ref, f)
        print(name, "done", [p["greedy_ids"][:4] for p in ref["prompts"]])


if __name__ == "__main__":
    main()
