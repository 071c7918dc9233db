#!/usr/bin/env python3
"""Regenerates the seed corpora of safetensors_fuzz and config_json_fuzz (run from the repo root).

Each seed is tiny: a few valid files laid out as the reference writer lays them out, and one
invalid file per defect the parser must reject."""
import json
import os
import struct

ST = "tests/fuzz/corpus/safetensors_fuzz"
CFG = "tests/fuzz/corpus/config_json_fuzz"


def raw(header, data=b"", hlen=None):
    h = header.encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def padded(obj, data):
    h = json.dumps(obj, separators=(",", ":"))
    return raw(h + " " * ((8 - len(h) % 8) % 8), data)


def put(directory, name, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(os.path.join(directory, name), mode) as f:
        f.write(content)


def safetensors_seeds():
    put(ST, "valid_f32_bf16", padded({"__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}, bytes(range(22))))
    put(ST, "valid_all_dtypes", padded({
        "a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]},
        "c": {"dtype": "I32", "shape": [1], "data_offsets": [12, 16]},
        "d": {"dtype": "F16", "shape": [1, 1], "data_offsets": [16, 18]},
        "e": {"dtype": "U8", "shape": [2], "data_offsets": [18, 20]},
        "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [20, 20]}}, bytes(20)))
    put(ST, "valid_empty", raw("{}      "))
    put(ST, "valid_unpadded", raw('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0\0\x80\x3f"))
    put(ST, "bad_truncated", b"\x10\0\0")
    put(ST, "bad_header_len", raw("{}", b"", 4096))
    put(ST, "bad_not_json", raw("{nope"))
    put(ST, "bad_overlap", raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                               '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)))
    put(ST, "bad_out_of_range", raw('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8)))
    put(ST, "bad_size_mismatch", raw('{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}', bytes(8)))
    put(ST, "bad_dtype", raw('{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', bytes(8)))
    put(ST, "bad_overflow", raw('{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],'
                                '"data_offsets":[0,8]}}', bytes(8)))
    put(ST, "bad_metadata", raw('{"__metadata__":{"k":1}}'))


def config_seeds():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}

    def cfg(name, obj):
        put(CFG, name, obj if isinstance(obj, str) else json.dumps(obj, indent=1))

    cfg("llama_minimal", base)
    cfg("llama31_8b", dict(base, num_key_value_heads=2, eos_token_id=[128001, 128008, 128009],
        bos_token_id=128000, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=131072,
        attention_bias=False, mlp_bias=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}))
    cfg("mistral_7b", dict(base, architectures=["MistralForCausalLM"], num_key_value_heads=2,
        sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2))
    cfg("mistral_nowindow", dict(base, architectures=["MistralForCausalLM"], num_key_value_heads=4,
        sliding_window=None, head_dim=32))
    cfg("qwen2_05b", dict(base, architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=131072, max_window_layers=2,
        rope_theta=1e6, eos_token_id=151643, bos_token_id=151643, cleave_kv_block_size=32))
    cfg("qwen2_sliding", dict(base, architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
        use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"] * 2))
    cfg("rope_v5", dict({k: v for k, v in base.items() if k != "architectures"}, model_type="llama",
        dtype="float16", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    cfg("bad_types", '{"architectures": "LlamaForCausalLM", "hidden_size": "64", "vocab_size": 1e3, '
        '"eos_token_id": [1, "2"]}')
    cfg("bad_arch", '{"architectures": ["GPT2LMHeadModel"], "rope_scaling": {"type": "yarn"}}')


if __name__ == "__main__":
    os.makedirs(ST, exist_ok=True)
    os.makedirs(CFG, exist_ok=True)
    safetensors_seeds()
    config_seeds()
