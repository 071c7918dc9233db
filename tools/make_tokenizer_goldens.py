#!/usr/bin/env python3
"""Builds the tokenizer fixtures and parity goldens under tests/data/tokenizers/.

Run by hand from the repository root (outputs are committed):
    pip install tokenizers sentencepiece transformers protobuf
    python3 tools/make_tokenizer_goldens.py

Writes:
  bytelevel/tokenizer.json     byte-level BPE (vocab 800) trained here with a Llama-3-style Split
                               regex + ByteLevel pre-tokenizer, ignore_merges, <|...|> specials.
  llama2_sp/tokenizer.json     tok512.model converted the way Llama-2's tokenizer.json is laid out:
                               normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer,
                               byte_fallback, decoder Replace/ByteFallback/Fuse/Strip.
  llama_metaspace/tokenizer.json  the same vocabulary as converted by transformers' non-legacy path:
                               pre_tokenizer Metaspace(prepend_scheme "first", split false).
  parity.json                  the test strings and, for each tokenizer, the ids the reference
                               library (tokenizers / sentencepiece) produces, plus its decode.

Everything is deterministic: the training corpus and the test strings come from a seeded RNG.
"""

import json
import os
import random
import sys
import tempfile
import shutil

import sentencepiece as spm
from tokenizers import Tokenizer, Regex, AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "tokenizers")
SP_MODEL = os.path.join(ROOT, "..", "shared", "models", "stories260K", "tok512.model")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTELEVEL_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                      "<|start_header_id|>", "<|end_header_id|>"]

# Fragments the corpus and the random test strings are built from.
WORDS = ("the quick brown fox jumps over lazy dog and then runs away into forest where "
         "she found little bird singing happy song about sunny day while children played "
         "with ball under big tree tokenizer model server request batch cache block "
         "attention layer token decode encode prefill stream").split()
UNICODE_FRAGMENTS = [
    "café", "naïve", "résumé", "Ærøskøbing", "straße", "Ünïcödé", "e\u0301", "n\u0303",
    "你好", "世界", "中文分词", "日本語", "テキスト", "ひらがな", "안녕하세요", "한국어",
    "مرحبا", "بالعالم", "שלום", "עולם", "Привет", "мир", "Γειά σου", "κόσμε",
    "สวัสดี", "नमस्ते", "দুনিয়া", "ሰላም", "Ⅻ", "①②③", "½", "x²", "∑∫∂", "→⇒",
    "😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "🇺🇸", "🇯🇵", "❤\ufe0f",
    "\u200b", "\u00a0", "\u3000", "\u2028", "\u180e", "\ufeff", "\ufffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠜎",
]
CODE_FRAGMENTS = [
    "def f(x):\n    return x + 1\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if (a && b || !c) { return -1; }", "{\"key\": [1, 2, 3], \"ok\": true}",
    "https://example.com/path?q=1&r=two#frag", "x = y ** 2 // 3 % 7", "#include <vector>",
    "SELECT * FROM t WHERE id = 42;", "<div class=\"a\">text</div>", "$HOME/.config",
    "std::vector<int32_t> ids;", "// comment\n", "    indented\n\tTabbed",
]
SEPARATORS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "", ", ", ". ", "! ", "? "]
NUMBERS = ["0", "7", "42", "123", "1234", "12345678", "3.14159", "1,000,000", "2024-01-31",
           "-17", "1e-9", "0x7f", "٣٤٥", "１２３"]


def training_corpus(rng):
    """~3k lines of mixed text so the learnt merges cover English, code and some Unicode."""
    lines = []
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.7:
                w = rng.choice(WORDS)
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif r < 0.8:
                parts.append(rng.choice(NUMBERS))
            elif r < 0.93:
                parts.append(rng.choice(UNICODE_FRAGMENTS))
            else:
                parts.append(rng.choice(CODE_FRAGMENTS))
        lines.append(" ".join(parts) + rng.choice([".", "!", "?", "", ":"]))
    return lines


def train_bytelevel(rng):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800 - len(BYTELEVEL_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(rng), trainer)
    # Specials after training, as in Llama-3, so their ids follow the learnt vocabulary.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTELEVEL_SPECIALS])
    # One non-special added token exercises the "added but not special" path.
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok


class _SlowStub:
    """What transformers' LlamaConverter reads from a slow LlamaTokenizer."""

    def __init__(self, sp, legacy):
        self.vocab_file = SP_MODEL
        self.legacy = legacy
        self.add_prefix_space = True
        self._sp = sp

    def convert_ids_to_tokens(self, i):
        return self._sp.id_to_piece(i)


def convert_sp(sp, legacy):
    """tok512.model -> tokenizers.Tokenizer via transformers' LlamaConverter.

    transformers 5.x's SpmConverter.tokenizer() passes the vocab where it expects a model type, so
    the BPE model is built here the way 4.x did (merges ordered by piece score); the normalizer,
    pre-tokenizer and decoder are LlamaConverter's own.
    """
    import transformers.convert_slow_tokenizer  # noqa: F401  (module is shadowed by the function)
    conv_mod = sys.modules["transformers.convert_slow_tokenizer"]

    class Converter(conv_mod.LlamaConverter):
        def tokenizer(self, proto):
            vocab_scores = self.vocab(proto)
            vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
            merges = conv_mod.generate_merges(vocab, vocab_scores)
            tok = Tokenizer(models.BPE(vocab, merges, unk_token=proto.trainer_spec.unk_piece,
                                       fuse_unk=True, byte_fallback=True, dropout=None))
            tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                    for p in ("<unk>", "<s>", "</s>")])
            return tok

    tok = Converter(_SlowStub(sp, legacy)).converted()
    # What LlamaTokenizerFast.update_post_processor installs (add_bos_token=True, add_eos=False).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", sp.bos_id())])
    return tok


def test_strings(rng):
    fixed = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n  \n", "a", "A", "Hello",
        " Hello", "Hello ", "  Hello  ", "Hello world", "Hello  world", "Hello   world",
        "hello\tworld", "line1\nline2\r\nline3\n", "I'm", "I'M", "you'll", "they've", "DON'T",
        "it's John's", "'s'S'", "12345678", "3.14159", "1,000,000", "2024-01-31", "007",
        "supercalifragilisticexpialidocious", "ThisIsCamelCase", "snake_case_name",
        "a     b", "abc   ", "   abc", "abc\n\n\n", "\n\n\nabc", "x" * 64,
        "<|begin_of_text|>Hello", "Hello<|end_of_text|>", "<|begin_of_text|><|begin_of_text|>",
        "a <|eot_id|> b", "<|begin_of", "<|begin_of_text|", "<s>Hello</s>", "<s> Hello", "</s>",
        "<unk>", "<s><s>", "x<s>y", "<tool_call>{\"name\": \"f\"}", "<0x41>", "▁", "▁▁hello",
        " ▁ ", "▁hello▁world", "\x00", "\x7f", "\x1b[31mred\x1b[0m",
        "café naïve résumé", "e\u0301 vs é", "你好，世界！", "日本語のテキストです。",
        "안녕하세요 세계", "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε",
        "สวัสดีครับ", "नमस्ते दुनिया", "abc中文def", "😀", "😀😀😀", "👍🏽 ok",
        "👨\u200d👩\u200d👧\u200d👦 family", "🏳\ufe0f\u200d🌈", "🇺🇸🇯🇵", "❤\ufe0f", "I ❤ NY",
        "\u00a0nbsp\u00a0", "\u3000全角\u3000", "a\u2028b", "a\u180eb", "\u200bzw\u200b",
        "\ufeffbom", "\ufffd", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠜎𠜱𠝹", "½ ⅓ x² ∑∫", "٣٤٥ ١٢٣", "１２３ＡＢＣ",
    ] + CODE_FRAGMENTS
    pools = [WORDS, UNICODE_FRAGMENTS, CODE_FRAGMENTS, NUMBERS]
    weights = [0.55, 0.25, 0.08, 0.12]
    generated = []
    for _ in range(170):
        parts = []
        for _ in range(rng.randint(1, 6)):
            pool = rng.choices(pools, weights)[0]
            parts.append(rng.choice(pool))
            parts.append(rng.choice(SEPARATORS))
        s = "".join(parts)
        if rng.random() < 0.15:
            s = " " + s
        if rng.random() < 0.5:
            s = s.rstrip(" ") if rng.random() < 0.5 else s
        generated.append(s)
    seen, out = set(), []
    for s in fixed + generated:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def record(tok, strings, with_bos=True):
    """ids per string, plus decode(ids) where it differs from the string (to keep files small)."""
    entries = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False).ids
        entry = {"ids": ids}
        dec = tok.decode(ids, skip_special_tokens=False)
        if dec != s:
            entry["decode"] = dec
        entries.append(entry)
    out = {"encodings": entries}
    if with_bos:  # a few through the post-processor (BOS) to check add_bos
        out["with_bos"] = {str(i): tok.encode(strings[i], add_special_tokens=True).ids
                           for i in range(0, len(strings), 23)}
    return out


def bytelevel_pre(add_prefix_space=False, use_regex=False):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True,
            "use_regex": use_regex}


def split(pattern, behavior, invert=False, regex=True):
    return {"type": "Split", "pattern": {"Regex" if regex else "String": pattern},
            "behavior": behavior, "invert": invert}


def seq_pre(*parts):
    return {"type": "Sequence", "pretokenizers": list(parts)}


def added(id_, content, special=False, normalized=False, lstrip=False, rstrip=False,
          single_word=False):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": normalized, "special": special}


NFC_STRINGS = [
    "e\u0301", "E\u0301\u0327", "a\u0328\u0301", "a\u0301\u0328", "\u212b", "\u2126 ohm",
    "\u0344", "\u1100\u1161\u11a8", "\u1100\u1161 \uac00\u11a8", "\u0958", "\u0f73",
    "Ve\u0323\u0302t Nam", "\u1e0b\u0323", "q\u0307\u0323", "\u00c5\u0300", "ﬁ ligature",
    "\u0041\u030a\u0301", "\u05d1\u05bc", "\u0b47\u0b3e", "\u1026\u102e", "\u0300abc",
    "\U0001d15e", "\u3071 \u306f\u309a", "\ud55c\uad6d\uc5b4", "caf\u0065\u0301 na\u0131\u0308ve",
]
ADDED_STRINGS = [
    "a  <L>  b", "a  <R>  b", "<R> <L>", " \u3000<L>", "<R>  <L>", "x<L>", "foo", "a foo b",
    "_foo", "foo_", "afoo", "\u00e9foo", "1foo", "foo1", "-foo-", "foofoo", "ab foo", "\u00b2foo",
    "\u216bfoo", "foo\u200d", "ab c", "xab cy", " ab c", "ab cab c", "<|eot_id|> foo <R>x",
    "<tool_call><L>foo<R>", "", " ", "<L>",
]


def variants(bases, strings):
    """(name, base, patch, strings): a base file with some fields replaced ("a/b" = nested)."""
    every = lambda k, off=0: strings[off::k]
    nb = 801  # first free id after the bytelevel vocabulary and its added tokens
    bl_added = json.loads(bases["bytelevel"].to_str())["added_tokens"]
    sp_added = json.loads(bases["llama2_sp"].to_str())["added_tokens"]
    uni = [s for s in strings if any(ord(c) > 0x7F for c in s)]
    return [
        ("gpt2_regex", "bytelevel", {"pre_tokenizer": bytelevel_pre(False, True)}, every(4)),
        ("gpt2_prefix_space", "bytelevel", {"pre_tokenizer": bytelevel_pre(True, True)}, every(5, 1)),
        ("split_merged_previous", "bytelevel",
         {"pre_tokenizer": seq_pre(split(r"\s+", "MergedWithPrevious"), bytelevel_pre())}, every(7)),
        ("split_merged_next", "bytelevel",
         {"pre_tokenizer": seq_pre(split(r"[,.!?\s]", "MergedWithNext"), bytelevel_pre())}, every(7, 2)),
        ("split_contiguous_string", "bytelevel",
         {"pre_tokenizer": seq_pre(split(" ", "Contiguous", regex=False), bytelevel_pre())}, every(7, 3)),
        ("split_removed_inverted", "bytelevel",
         {"pre_tokenizer": seq_pre(split(r"\p{L}+", "Removed", invert=True), bytelevel_pre())},
         every(7, 4)),
        ("digits", "bytelevel",
         {"pre_tokenizer": seq_pre({"type": "Digits", "individual_digits": True},
                                   bytelevel_pre(False, True))}, every(6, 5)),
        ("nfc", "bytelevel", {"normalizer": {"type": "NFC"}}, NFC_STRINGS + uni[::3]),
        ("added_token_flags", "bytelevel", {"added_tokens": bl_added + [
            added(nb, "<L>", lstrip=True), added(nb + 1, "<R>", rstrip=True, special=True),
            added(nb + 2, "foo", single_word=True), added(nb + 3, "ab c", normalized=True)]},
         ADDED_STRINGS),
        ("added_normalized_llama2", "llama2_sp", {"added_tokens": sp_added + [
            added(512, "ab c", normalized=True), added(513, "<L>", lstrip=True, special=True)]},
         ADDED_STRINGS),
        ("metaspace_split_always", "llama_metaspace",
         {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                            "split": True},
          "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                      "split": True}}, every(6)),
        ("metaspace_legacy_fields", "llama_metaspace",  # pre-0.19 files: no prepend_scheme/split
         {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
          "decoder": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}},
         every(8, 1)),
        ("metaspace_never", "llama_metaspace",
         {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never",
                            "split": True},
          "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never",
                      "split": True}}, every(8, 5)),
        ("spm_whitespace_normalizer", "llama_metaspace",  # transformers 5's generic SPM layout
         {"normalizer": {"type": "Sequence", "normalizers": [
             {"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
             {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
             {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
             {"type": "Replace", "pattern": {"Regex": "\\A\u2581"}, "content": "\u2581\u2581"}]},
          "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                            "split": False}}, every(7, 2)),
        ("strip_normalizer", "llama2_sp",
         {"normalizer": {"type": "Sequence", "normalizers": [
             {"type": "Strip", "strip_left": True, "strip_right": True},
             {"type": "Prepend", "prepend": "\u2581"},
             {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}}, every(6, 3)),
        ("unk_fused", "llama2_sp", {"model/byte_fallback": False}, uni[::4]),
        ("unk_unfused", "llama2_sp", {"model/byte_fallback": False, "model/fuse_unk": False},
         uni[1::4]),
    ]


def apply_patch(base_json, patch):
    d = json.loads(base_json)
    for key, value in patch.items():
        node = d
        *path, last = key.split("/")
        for p in path:
            node = node[p]
        node[last] = value
    return Tokenizer.from_str(json.dumps(d))


def main():
    rng = random.Random(20240531)
    sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
    toks = {
        "bytelevel": train_bytelevel(rng),
        "llama2_sp": convert_sp(sp, legacy=True),
        "llama_metaspace": convert_sp(sp, legacy=False),
    }
    strings = test_strings(rng)
    parity = {"strings": strings, "tokenizers": {}}
    for name, tok in toks.items():
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        with open(os.path.join(OUT, name, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.to_str(pretty=False))
        # Reload from disk so the goldens come from exactly the file the C++ test reads.
        parity["tokenizers"][name] = record(
            Tokenizer.from_file(os.path.join(OUT, name, "tokenizer.json")), strings)
    parity["variants"] = []
    for name, base, patch, vstrings in variants(toks, strings):
        tok = apply_patch(toks[base].to_str(), patch)
        # Strings already in the main list are stored as their index.
        index = {t: i for i, t in enumerate(strings)}
        entry = {"name": name, "base": base, "patch": patch,
                 "strings": [index.get(t, t) for t in vstrings]}
        entry.update(record(tok, vstrings, with_bos=False))
        parity["variants"].append(entry)
    parity["sentencepiece"] = {
        "ids": [sp.encode(s) for s in strings],
        "ids_bos": [sp.encode(s, add_bos=True) for s in strings],
        "decode": [sp.decode(sp.encode(s)) for s in strings],  # every entry, unlike record()
    }
    with open(os.path.join(OUT, "parity.json"), "w", encoding="utf-8") as f:
        json.dump(parity, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    total = 0
    for dirpath, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(dirpath, fn)) for fn in files)
    print(f"{len(strings)} strings; {total / 1024:.0f} KiB under {OUT}")


if __name__ == "__main__":
    main()
