#!/usr/bin/env python3
"""Regenerates tests/data/sentencepiece/: small SentencePiece models trained here with the
reference library, and what it produces for them (read by tests/unit/sentencepiece_model_test.cc).

    pip install sentencepiece        # the goldens were made with sentencepiece 0.2.x
    python3 tools/make_sentencepiece_goldens.py   (from the repo root)
    python3 tools/make_sentencepiece_goldens.py --nfkc /tmp/spm-nfkc   (see below)

Each model covers settings tok512.model (BPE, byte fallback, identity normalizer) does not:
no byte fallback (<unk> runs), unigram, WORD / CHAR models, user-defined symbols, kept extra
whitespace, no dummy prefix, whitespace as suffix, character rules (a small custom charsmap, so
the darts-clone trie reader is exercised without nmt_nfkc's 240 KB table) and a denormalizer.
goldens.json: for every model, the ids of every test string and the decode of those ids, plus
the decode of random id sequences (byte runs that are not UTF-8, <unk>, control pieces).
It also rewrites the seed corpus of tests/fuzz/sentencepiece_model_fuzz.cc
(tests/fuzz/corpus/sentencepiece_model_fuzz/: these models, tok512, one file per load defect).

Models use the identity normalizer unless they say otherwise: nmt_nfkc's charsmap is 240 KB a
model, too big to commit. --nfkc DIR writes nmt_nfkc / nfkc_cf variants to DIR instead; run the
test against them with CLEAVE_SPM_GOLDENS_DIR=DIR build/bin/sentencepiece_model_test."""
import json
import os
import random
import sys
import tempfile

import sentencepiece as spm

OUT = "tests/data/sentencepiece"

WORDS = """the a an once upon time there was little girl named lily she liked to play outside
with her friend ben they found big red ball in park and ran after it happy sun sky blue tree
dog cat bird fish water said mom went home ate cake day night moon star looked saw smiled
cafe naive resume jalapeno über straße déjà vu x1 x2 2024 3.14 100% e-mail i'm don't it's
function return value int main printf hello world foo bar baz qux (){}[]<>=+-*/ _ # @""".split()

# Character rules for the "rules" model (hex code points source -> target, as in upstream's
# normalization_rule_tsv): fullwidth letters/digits, a ligature, NBSP and tab to space, and
# zero-width space to nothing.
RULES = ["FF21\t41", "FF22\t42", "FF41\t61", "FF42\t62", "FF10\t30", "FF11\t31", "FB01\t66 69",
         "A0\t20", "9\t20", "200B\t", "2460\t31", "41 41\t61 61"]
# The denormalizer maps "aa" back to "AA" in decoded text.
DENORM_RULES = ["61 61\t41 41"]

NFKC_MODELS = {
    "bpe_nmt_nfkc": dict(model_type="bpe", vocab_size=400, byte_fallback=True,
                         normalization_rule_name="nmt_nfkc"),
    "unigram_nfkc_cf": dict(model_type="unigram", vocab_size=220,
                            normalization_rule_name="nfkc_cf", remove_extra_whitespaces=False),
    "unigram_nmt_nfkc_unk": dict(model_type="unigram", vocab_size=200, character_coverage=0.99,
                                 normalization_rule_name="nmt_nfkc"),
}

MODELS = {
    # name: extra trainer arguments
    "bpe_unk": dict(model_type="bpe", vocab_size=180, character_coverage=0.98,
                    remove_extra_whitespaces=False),
    "bpe_udef_bytes": dict(model_type="bpe", vocab_size=400, byte_fallback=True,
                           user_defined_symbols=["<tool>", "@@", "▁▁", "foo bar"],
                           split_digits=True),
    "unigram_rules": dict(model_type="unigram", vocab_size=220, normalization_rule_tsv="RULES",
                          denormalization_rule_tsv="DENORM", user_defined_symbols=["<tool>"]),
    "unigram_bytes_nodummy": dict(model_type="unigram", vocab_size=350, byte_fallback=True,
                                  add_dummy_prefix=False, remove_extra_whitespaces=False),
    "unigram_suffix": dict(model_type="unigram", vocab_size=200, treat_whitespace_as_suffix=True),
    "word": dict(model_type="word", vocab_size=120, character_coverage=1.0),
    "char": dict(model_type="char", vocab_size=60, character_coverage=0.999,
                 user_defined_symbols=["<tool>"]),
    # Edited after training (EDITS below): some merged pieces UNUSED, which BPE must split back.
    "bpe_unused_ctl": dict(model_type="bpe", vocab_size=250, control_symbols=["<ctl>"],
                           user_defined_symbols=["<u>"]),
    # <unk> made NORMAL: a byte-fallback model may have no UNKNOWN piece at all.
    "unigram_bytes_nounk": dict(model_type="unigram", vocab_size=400, byte_fallback=True),
}


def edit_model(name, path):
    """Post-training edits no trainer flag produces, but files in the wild contain."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    if name not in ("bpe_unused_ctl", "unigram_bytes_nounk"):
        return
    m = pb.ModelProto()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    if name == "bpe_unused_ctl":
        for i, p in enumerate(m.pieces):
            if p.type == p.NORMAL and len(p.piece) > 1 and i % 3 == 0:
                p.type = p.UNUSED
    else:
        m.pieces[0].type = m.pieces[0].NORMAL
    with open(path, "wb") as f:
        f.write(m.SerializeToString())

FIXED = [
    "", " ", "   ", "Hello world", "  Hello   world  ", "once upon a time", "\tTab\tand\nnewline",
    "a  b   c    d", " leading", "trailing ", "中文字符", "emoji 😀👍🏽 here", "naïve café", "déjà vu",
    "x1 x2 2024 3.14", "<tool>call</tool>", "foo bar foo  bar", "@@@@", "▁literal▁meta",
    "ＡＢ ａｂ ０１ ﬁne ①", "zero\u200bwidth", "nbsp\u00a0here", "AAA aa AA", "Ω≈ç√∫˜µ≤≥÷",
    "\u0301combining first", "e\u0301 vs é", "🏳️‍🌈 flag", "한국어 テキスト", "ⓐⓑⓒ", "x", "xx",
    "the the the the the the the the", "THE BIG RED BALL", "it's i'm don't", "a\u3000b",
    "\U0001F600", "end.", "<ctl><u>x<u>", "a" * 100, "the ball " * 20,
]


def corpus(rng):
    lines = []
    for _ in range(4000):
        n = rng.randint(3, 14)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)))
    lines += ["ｆｕｌｌｗｉｄｔｈ ＡＢ ０１ ﬁ", "AA aa", "① ② ③"] * 3
    return lines


def random_strings(rng, n):
    pool = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,'!-") + [
        "  ", "   ", "\t", "\n", "é", "ß", "中", "文", "😀", "🏽", "▁", "<tool>", "@@", "ａ", "ﬁ",
        "\u00a0", "\u200b", "AA", "the ", "ball ", "<s>", "</s>", "<unk>", "Ω", "<ctl>", "<u>",
        "zz", "zzz"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 24))) for _ in range(n)]


FUZZ = "tests/fuzz/corpus/sentencepiece_model_fuzz"
TOK512 = "../shared/models/stories260K/tok512.model"


def fuzz_seeds():
    """Seeds for tests/fuzz/sentencepiece_model_fuzz.cc: the small models above, tok512, and one
    defect per thing the loader must reject."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def put(name, data):
        with open(os.path.join(FUZZ, name), "wb") as f:
            f.write(data)

    def model(path):
        m = pb.ModelProto()
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
        return m

    os.makedirs(FUZZ, exist_ok=True)
    with open(TOK512, "rb") as f:
        tok512 = f.read()
    put("valid_tok512", tok512)
    put("valid_tok512_text", tok512 + "#TXT  Once upon\ta time 中文 😀 ÿ".encode())
    for name in ("char", "word", "unigram_rules", "bpe_unk"):
        with open(os.path.join(OUT, name + ".model"), "rb") as f:
            put("valid_" + name, f.read() + "#TXT<tool> ＡＢ ﬁ aa  x".encode())
    put("bad_truncated", tok512[:777])
    m = model(os.path.join(OUT, "char.model"))
    del m.pieces[0]  # <unk>
    put("bad_no_unk", m.SerializeToString())
    m = model(os.path.join(OUT, "unigram_rules.model"))
    cm = bytearray(m.normalizer_spec.precompiled_charsmap)
    cm[0:4] = (len(cm) + 100).to_bytes(4, "little")
    m.normalizer_spec.precompiled_charsmap = bytes(cm)
    put("bad_charsmap_size", m.SerializeToString())
    m = model(os.path.join(OUT, "unigram_rules.model"))
    cm = bytearray(m.normalizer_spec.precompiled_charsmap)
    rng = random.Random(5)
    for _ in range(40):  # scribble over the trie units: indices must be bounds-checked
        cm[4 + rng.randrange(len(cm) - 4)] = rng.randrange(256)
    m.normalizer_spec.precompiled_charsmap = bytes(cm)
    put("odd_charsmap_trie", m.SerializeToString() + b"#TXTabc\tAA\xa0")


def main():
    out, models = OUT, MODELS
    if len(sys.argv) == 3 and sys.argv[1] == "--nfkc":
        out, models = sys.argv[2], NFKC_MODELS
    rng = random.Random(20250101)
    os.makedirs(out, exist_ok=True)
    strings = FIXED + random_strings(rng, 100)
    goldens = {"strings": strings, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus(rng)) + "\n")
        for path, rules in (("RULES", RULES), ("DENORM", DENORM_RULES)):
            with open(os.path.join(tmp, path), "w") as f:
                f.write("\n".join(rules) + "\n")
        for name, args in models.items():
            args = dict(args)
            args.setdefault("normalization_rule_name", "identity")
            for key in ("normalization_rule_tsv", "denormalization_rule_tsv"):
                if key in args:
                    args[key] = os.path.join(tmp, args[key])
            spm.SentencePieceTrainer.train(
                input=text, model_prefix=os.path.join(out, name), num_threads=1,
                hard_vocab_limit=False, minloglevel=2, **args)
            os.remove(os.path.join(out, name + ".vocab"))
            edit_model(name, os.path.join(out, name + ".model"))
            sp = spm.SentencePieceProcessor(model_file=os.path.join(out, name + ".model"))
            ids = [sp.encode(s) for s in strings]
            n = sp.get_piece_size()
            id_runs = []
            for _ in range(60):
                run = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
                # Bias towards byte pieces and control/unknown ids, where decoding has rules.
                if rng.random() < 0.5:
                    bytes_ids = [i for i in range(n) if sp.is_byte(i)]
                    if bytes_ids:
                        run += [rng.choice(bytes_ids) for _ in range(rng.randint(1, 5))]
                if rng.random() < 0.3:
                    run.insert(rng.randrange(len(run) + 1), rng.randrange(3))
                id_runs.append(run)
            goldens["models"][name] = {
                "piece_size": n, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
                "unk_id": sp.unk_id(),
                "ids": ids,
                "decode": [sp.decode(i) for i in ids],
                "id_runs": id_runs,
                "id_runs_decode": [sp.decode(r) for r in id_runs],
            }
    with open(os.path.join(out, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(goldens, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    if out == OUT:
        fuzz_seeds()
    total = sum(os.path.getsize(os.path.join(out, fn)) for fn in os.listdir(out))
    print(f"{len(models)} models, {len(strings)} strings; {total / 1024:.0f} KiB under {out}")


if __name__ == "__main__":
    main()
