#!/usr/bin/env python3
"""Write a byte-level tokenizer.json (256 tokens, one per byte, no merges) into model directories.

The tiny golden models (tests/data/golden/<name>/, vocab 256) were trained on nothing, so any
tokenizer is as good as another; this one makes them usable from `cleave generate --prompt` and
`cleave serve` (text in, text out) without a download. It is the GPT-2 byte-level scheme with an
empty merge list, built with the `tokenizers` library so the file is exactly what HF writes.

    python tools/make_byte_tokenizer.py tests/data/golden/mixtral tests/data/golden/mamba ...
"""
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_tokenizer() -> Tokenizer:
    # ByteLevel's alphabet maps the 256 bytes to printable characters; id = the byte value.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # bytes_to_unicode order: the printable ASCII / Latin-1 bytes map to themselves, the rest to
    # U+0100 onwards in byte order. Rebuild that mapping to give each character its byte's id.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    assert set(vocab) == set(alphabet) and len(vocab) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def main(dirs):
    tok = byte_tokenizer()
    for d in dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
        path = Path(d) / "tokenizer.json"
        tok.save(str(path))
        print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:])
