#!/usr/bin/env python3
"""Generate the golden data that cleave's C++ engine tests compare against.

Usage (run by hand; CI never runs this, it only reads the committed outputs):

    pip install torch transformers safetensors numpy sentencepiece   # CPU torch is enough
    python tools/make_goldens.py --out tests/data/golden

Options:
    --out DIR          output directory (default tests/data/golden)
    --only NAME ...    regenerate only these entries (model names, or "stories260k")
    --stories DIR      the stories260K folder (default ../shared/models/stories260K
                       relative to the repo root, falling back to /work/shared/models/stories260K)

What it writes (see tests/data/golden/README.md for the schema):

  * <out>/<name>/ for each tiny randomly initialised model: config.json and model.safetensors
    (or model-0000i-of-0000n.safetensors + model.safetensors.index.json) exactly as
    transformers' save_pretrained(safe_serialization=True) writes them, plus golden.json:
        {"prompts": [{"prompt_ids": [...], "last_logits": [vocab floats],
                      "greedy_tokens": [32 ids]}, ...], ...metadata...}
    The golden numbers are computed by *reloading the saved directory* with
    from_pretrained(..., dtype=float32, attn_implementation="eager") so they describe exactly
    the files on disk (for llama_bf16 that means the bf16 weights widened to f32).
  * <out>/stories260k.json: the llama2.c stories260K checkpoint converted in memory (by an
    independent converter in this file) to a HF LlamaForCausalLM; 200 greedy tokens from BOS
    and the logits at the BOS position, plus a "prompts" list in the same schema.

Greedy decoding: exactly N new tokens, never stopping at EOS. Each sequence is produced by
transformers' generate() (do_sample=False, eos disabled, KV cache) and cross-checked against a
cache-free full-recompute argmax loop; both must agree. For every greedy step the gap between
the top-2 logits is measured; a random model whose minimum gap is below MIN_GAP is re-seeded
(seed += 1) so the C++ tests are not flaky. Everything is seeded: reruns give identical bytes
for the same torch/transformers versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

MIN_GAP = 5e-3          # required minimum top-2 logit gap over all greedy steps (brief: >= 1e-3)
NEW_TOKENS = 32
PROMPT_LENS = (5, 17, 70)  # 70 spans several 16-token KV blocks / prefill chunks
MAX_SEED_TRIES = 50

ARCH = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

# Common small shape: vocab 256, hidden 64, 8 query heads / 2 KV heads (head_dim 8).
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

SPECS = [
    dict(name="llama_gqa_tied", arch="llama", seed=1000,
         cfg=dict(tie_word_embeddings=True, rope_theta=10000.0)),
    dict(name="llama_untied_llama3", arch="llama", seed=2000,
         cfg=dict(tie_word_embeddings=False, rope_theta=500000.0, head_dim=16,
                  intermediate_size=128, rms_norm_eps=1e-5,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64})),
    dict(name="llama_linear_rope", arch="llama", seed=3000,
         cfg=dict(tie_word_embeddings=True, rope_theta=10000.0,
                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
    dict(name="qwen2_bias", arch="qwen2", seed=4000,
         cfg=dict(tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)),
    dict(name="mistral", arch="mistral", seed=5000,
         cfg=dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None,
                  num_hidden_layers=3, intermediate_size=128)),
    dict(name="mistral_swa", arch="mistral", seed=6000,
         cfg=dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=8,
                  num_hidden_layers=3, intermediate_size=128)),
    dict(name="llama_bf16", arch="llama", seed=7000, save_dtype=torch.bfloat16,
         cfg=dict(tie_word_embeddings=False, rope_theta=10000.0)),
    dict(name="llama_sharded", arch="llama", seed=8000, max_shard_size="200KB",
         cfg=dict(tie_word_embeddings=False, rope_theta=10000.0)),
]

WEIGHT_STD = 0.15    # std of every weight matrix / embedding (large enough for separated logits)
BIAS_STD = 0.1       # biases are randomised too (HF zero-inits them, which would test nothing)
NORM_STD = 0.1       # RMSNorm weights = 1 + N(0, NORM_STD^2) so a missing norm weight shows up


# --------------------------------------------------------------------------------------------
# JSON writing with float32 values at 9 significant digits (round-trips float32 exactly).

def _fmt(obj, indent=0):
    pad = " " * indent
    if isinstance(obj, dict):
        items = [f'{pad}  {json.dumps(k)}: {_fmt(v, indent + 2).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in obj):
            return pad + "[" + ", ".join(_scalar(x) for x in obj) + "]"
        return pad + "[\n" + ",\n".join(_fmt(x, indent + 2) for x in obj) + "\n" + pad + "]"
    return pad + _scalar(obj)


def _scalar(x):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError("non-finite float in golden data")
        s = format(x, ".9g")
        return s
    raise TypeError(type(x))


def write_json(path: Path, obj) -> None:
    text = _fmt(obj) + "\n"
    json.loads(text)  # sanity: valid JSON
    path.write_text(text)


def f32_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().to(torch.float32).numpy().astype(np.float32)]


# --------------------------------------------------------------------------------------------
# Greedy decoding and checks.

def top2_gap(logits: torch.Tensor) -> float:
    v = torch.topk(logits.float(), 2).values
    return float(v[0] - v[1])


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int):
    """Cache-free greedy loop: full recompute each step. Returns (tokens, per-step logits)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    toks, steps = [], []
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        steps.append(logits)
        nxt = int(torch.argmax(logits))
        toks.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return toks, steps


@torch.no_grad()
def greedy_generate(model, prompt: list[int], n: int):
    """transformers' own greedy generate() with the KV cache; EOS never stops it."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
        output_logits=True, return_dict_in_generate=True, use_cache=True)
    toks = out.sequences[0, len(prompt):].tolist()
    assert len(toks) == n, (len(toks), n)
    return toks, [l[0].float() for l in out.logits]


@torch.no_grad()
def make_prompt_golden(model, prompt: list[int], n: int, label: str):
    gen_toks, gen_logits = greedy_generate(model, prompt, n)
    ref_toks, ref_logits = greedy_reference(model, prompt, n)
    if gen_toks != ref_toks:
        raise RuntimeError(f"{label}: generate() and full-recompute greedy disagree:\n"
                           f"{gen_toks}\n{ref_toks}")
    max_diff = max(float((a - b).abs().max()) for a, b in zip(gen_logits, ref_logits))
    gaps = [top2_gap(l) for l in ref_logits]
    last = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].float()
    assert torch.equal(last, ref_logits[0])
    return {
        "prompt_ids": list(prompt),
        "last_logits": f32_list(last),
        "greedy_tokens": ref_toks,
    }, min(gaps), max_diff


# --------------------------------------------------------------------------------------------
# Tiny random models.

def randomize_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is yielded once (as embed)
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * r)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * r)
            else:
                p.copy_(WEIGHT_STD * r)


def make_prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in PROMPT_LENS:
        body = torch.randint(3, vocab, (n - 1,), generator=g).tolist()
        prompts.append([1] + body)  # BOS first
    return prompts


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def build_model(spec: dict, out: Path) -> dict:
    name = spec["name"]
    cfg_cls, model_cls = ARCH[spec["arch"]]
    kw = dict(BASE)
    kw.update(spec["cfg"])
    d = out / name
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        torch.manual_seed(seed)
        config = cfg_cls(**kw, attn_implementation="eager")
        config.dtype = torch.float32
        model = model_cls(config).eval()
        randomize_(model, seed)
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        save_kw = dict(safe_serialization=True)
        if "max_shard_size" in spec:
            save_kw["max_shard_size"] = spec["max_shard_size"]
        to_save = model.to(spec["save_dtype"]) if "save_dtype" in spec else model
        to_save.save_pretrained(d, **save_kw)
        # transformers also writes generation_config.json; the engine doesn't read it.
        gc = d / "generation_config.json"
        if gc.exists():
            gc.unlink()

        # Goldens come from the files on disk, widened to f32.
        m = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        assert all(p.dtype == torch.float32 for p in m.parameters())
        assert m.config._attn_implementation == "eager", m.config._attn_implementation
        if "save_dtype" in spec:
            # the reloaded f32 weights must be exactly the bf16 values
            for (n1, p1), (n2, p2) in zip(to_save.named_parameters(), m.named_parameters()):
                assert n1 == n2 and torch.equal(p1.float(), p2), n1

        prompts = make_prompts(config.vocab_size, seed + 12345)
        entries, gaps, diffs = [], [], []
        for i, p in enumerate(prompts):
            e, gap, diff = make_prompt_golden(m, p, NEW_TOKENS, f"{name}[{i}]")
            entries.append(e)
            gaps.append(gap)
            diffs.append(diff)
        min_gap = min(gaps)
        if min_gap < MIN_GAP:
            print(f"  {name}: seed {seed} min top-2 gap {min_gap:.3g} < {MIN_GAP}; re-seeding")
            continue
        golden = {
            "model": name,
            "architecture": model_cls.__name__,
            "seed": seed,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "min_top2_gap": min_gap,
            "prompts": entries,
        }
        write_json(d / "golden.json", golden)
        info = dict(name=name, seed=seed, min_gap=min_gap, max_cache_vs_nocache=max(diffs),
                    size=dir_size(d), files=sorted(f.name for f in d.iterdir()),
                    tokens=[e["greedy_tokens"] for e in entries])
        print(f"  {name}: seed {seed}, min top-2 gap {min_gap:.4g}, "
              f"generate-vs-recompute max |dlogit| {max(diffs):.3g}, "
              f"{info['size']} bytes, files {info['files']}")
        return info
    raise RuntimeError(f"{name}: no seed gave a top-2 gap >= {MIN_GAP}")


@torch.no_grad()
def check_sliding_window(out: Path) -> None:
    """Show that transformers' eager Mistral really applies sliding_window=8: the same weights
    with the window removed must give different logits on the 70-token prompt but identical
    logits on a prompt no longer than the window."""
    d = out / "mistral_swa"
    m = MistralForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    cfg = MistralConfig.from_pretrained(d)
    cfg.sliding_window = None
    full = MistralForCausalLM(cfg).eval()
    full.load_state_dict(m.state_dict())
    full.config._attn_implementation = "eager"
    golden = json.loads((d / "golden.json").read_text())
    long_p = torch.tensor([golden["prompts"][-1]["prompt_ids"]])
    short_p = long_p[:, :8]
    dl = float((m(long_p).logits - full(long_p).logits).abs().max())
    ds = float((m(short_p).logits - full(short_p).logits).abs().max())
    # first 8 positions of the long prompt are inside the window either way
    d8 = float((m(long_p).logits[0, :8] - full(long_p).logits[0, :8]).abs().max())
    print(f"  mistral_swa check: |window - full| long prompt {dl:.3g}, "
          f"prompt of 8 tokens {ds:.3g}, first 8 positions of long {d8:.3g}")
    if not (dl > 1e-2 and ds < 1e-5 and d8 < 1e-5):
        raise RuntimeError("sliding window does not behave as expected in this transformers")


# --------------------------------------------------------------------------------------------
# stories260K: independent llama2.c -> HF converter.

def load_llama2c(path: Path) -> tuple[LlamaForCausalLM, dict]:
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = data[pos:pos + n].reshape(shape)
        pos += n
        return torch.from_numpy(a.copy())

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    pos += seq_len * head_dim // 2 * 2  # legacy freq_cis_real / freq_cis_imag
    wcls = emb if shared else take(vocab, dim)
    assert pos == data.size, (pos, data.size)

    def permute(w, heads):
        # llama2.c / Meta layout rotates interleaved pairs (2i, 2i+1) of each head; HF rotates
        # halves (i, i + head_dim/2). Same as transformers' convert_llama_weights_to_hf permute.
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    if not shared:
        sd["lm_head.weight"] = wcls
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "self_attn.q_proj.weight"] = permute(wq[i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(wk[i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if shared:
        assert torch.equal(model.lm_head.weight, emb)
    meta = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                vocab_size=vocab, seq_len=seq_len, shared_classifier=shared)
    return model, meta


def build_stories(stories_dir: Path, out: Path) -> dict:
    import sentencepiece as spm

    model, meta = load_llama2c(stories_dir / "stories260K.bin")
    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tok512.model"))
    print(f"  stories260K header: {meta}")

    e0, gap0, diff0 = make_prompt_golden(model, [1], 200, "stories260k[BOS]")
    text = sp.decode(e0["greedy_tokens"])
    p1 = sp.encode("Once upon a time", add_bos=True)
    e1, gap1, diff1 = make_prompt_golden(model, p1, NEW_TOKENS, "stories260k[once]")
    expect = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
              "in the park.")
    if not text.startswith(expect):
        raise RuntimeError(f"stories260K conversion is wrong; greedy text:\n{text}")
    golden = {
        "model": "stories260K",
        "checkpoint": "stories260K.bin (llama2.c legacy format)",
        "header": meta,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "prompt_ids": e0["prompt_ids"],
        "greedy_tokens": e0["greedy_tokens"],
        "text": text,
        "last_logits": e0["last_logits"],
        "min_top2_gap": min(gap0, gap1),
        "prompts": [
            e0,
            dict(e1, text=sp.decode(e1["greedy_tokens"]), prompt_text="Once upon a time"),
        ],
    }
    path = out / "stories260k.json"
    write_json(path, golden)
    print(f"  stories260k: min top-2 gap BOS/200 {gap0:.4g}, 'Once upon a time'/32 {gap1:.4g}; "
          f"generate-vs-recompute max |dlogit| {max(diff0, diff1):.3g}; {path.stat().st_size} bytes")
    print(f"  'Once upon a time' ids {p1} -> {sp.decode(e1['greedy_tokens'])!r}")
    print("  text:\n" + text)
    return dict(name="stories260k", min_gap=min(gap0, gap1), size=path.stat().st_size)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=repo / "tests" / "data" / "golden")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--stories", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # deterministic reduction order
    torch.use_deterministic_algorithms(True)
    stories = args.stories
    if stories is None:
        for cand in (repo.parent / "shared" / "models" / "stories260K",
                     Path("/work/shared/models/stories260K")):
            if (cand / "stories260K.bin").exists():
                stories = cand
                break
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    want = set(args.only) if args.only else None
    results = []
    for spec in SPECS:
        if want is None or spec["name"] in want:
            results.append(build_model(spec, args.out))
            if spec["name"] == "mistral_swa":
                check_sliding_window(args.out)
    if want is None or "stories260k" in want:
        if stories is None:
            print("stories260K not found; skipping (use --stories DIR)", file=sys.stderr)
        else:
            results.append(build_stories(stories, args.out))
    print("\nsummary:")
    for r in results:
        print(f"  {r['name']:22s} min top-2 gap {r['min_gap']:.4g}  {r['size']:>8d} bytes")
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"  total under {args.out}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
