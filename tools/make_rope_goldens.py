"""RoPE inverse frequencies exactly as transformers computes them (float32 torch ops), for
tests/unit/rope_test.cc. Run by hand: python tools/make_rope_goldens.py > tests/data/rope_inv_freq.json
"""
import json

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CASES = [
    dict(dim=128, theta=10000.0),
    dict(dim=128, theta=500000.0),
    dict(dim=64, theta=10000.0),
    dict(dim=96, theta=1e6),
    dict(dim=80, theta=10000.0),
    dict(dim=128, theta=10000.0, scaling=dict(rope_type="linear", factor=4.0)),
    dict(dim=128, theta=500000.0, scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)),
    dict(dim=128, theta=500000.0, scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=8.0, original_max_position_embeddings=4096)),
    dict(dim=16, theta=500000.0, scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
]


def inv_freq(case):
    heads = 4
    params = {"rope_type": "default", "rope_theta": case["theta"]}
    params.update(case.get("scaling", {}))
    cfg = LlamaConfig(hidden_size=case["dim"] * heads, num_attention_heads=heads, head_dim=case["dim"],
                      max_position_embeddings=131072, rope_parameters=params)
    fn = ROPE_INIT_FUNCTIONS[params["rope_type"]] if params["rope_type"] != "default" else None
    if fn is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        f, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        f, _ = fn(cfg, "cpu")
    assert f.dtype == torch.float32
    return [float(x) for x in f.tolist()]


out = [dict(case, inv_freq=inv_freq(case)) for case in CASES]
print(json.dumps(out, indent=1))
