#!/usr/bin/env python3
"""Writes the tokenizer oracle fixtures under tests/fixtures/tokenizer/.

Every expected id here comes from Hugging Face `tokenizers` (and `transformers` for turning GGUF
vocabularies into tokenizer.json), never from this project's code.

For each tokenizer <name> the script writes tests/fixtures/tokenizer/<name>/expected.json:
  source            how the C++ test builds the tokenizer: "tokenizer.json" (committed next to
                    expected.json) or "gguf:<file name>" (a vocabulary GGUF from the shared test
                    vocabularies, or "gguf:default-model" for the default model's GGUF)
  strings           hard strings with their ids (add_special false and true) and the decode of
                    the ids (skip_special_tokens=False)
  wikitext          the WikiText-103 test file cut into chunks of 500 lines (split on '\\n', each
                    line keeps its newline), each chunk encoded on its own without special tokens:
                    per chunk the token count and a 64-bit FNV-1a hash of the ids (each id as 4
                    little-endian bytes); plus the full ids of the first chunk for readable diffs.

Tokenizers:
  gpt2_trained      byte-level BPE, GPT-2 regex (ByteLevel use_regex), ~2000 tokens trained here
  qwen2_trained     byte-level BPE, NFC normalizer, Split(Qwen2 regex) + ByteLevel(no regex),
                    trained here
  llama3_trained    byte-level BPE, Split(Llama-3 regex) + ByteLevel, ignore_merges, BOS template
  spm_legacy_trained   SentencePiece-style BPE with byte fallback, Llama-2 style normalizer
                    (Prepend "▁" + Replace " " -> "▁"), BOS template, trained here
  spm_metaspace_trained  the same model kind with a Metaspace(prepend_scheme=first, split=true)
                    pre-tokenizer and a Metaspace decoder
  smollm2           the default model's tokenizer: transformers' conversion of the GGUF, with the
                    pre-tokenizer of the published SmolLM2 tokenizer.json (Digits(individual) then
                    ByteLevel); the C++ tests check both the committed tokenizer.json and the GGUF
  gpt2_gguf         ggml-vocab-gpt-2.gguf converted by transformers (C++ reads the GGUF)
  llama_spm_gguf    ggml-vocab-llama-spm.gguf converted by transformers, with the normalizer of
                    the original Llama-2 tokenizer.json (the tokenizer the .out ids of that vocab
                    come from) (C++ reads the GGUF)
  gemma3            Gemma-3-270M's tokenizer as transformers builds it from the GGUF (C++ reads
                    models/gemma-3-270m-q4_k_m.gguf, source "gguf:gemma3-model"; its 262,144-token
                    vocabulary is not committed); written only by --gemma3

It also writes tests/fixtures/tokenizer/nfc_cases.json: random strings dense in combining marks,
Hangul jamo and composition exclusions with their NFC form from Python's unicodedata.

The trained vocabularies learn from the WikiText-2 validation text (disjoint from the test text).
Training may break frequency ties differently from run to run, so re-running can give a slightly
different vocabulary; each tokenizer.json is always written together with its expected.json.

Usage: python3 scripts/make_tokenizer_fixtures.py [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
       [--data ../shared/data]
       python3 scripts/make_tokenizer_fixtures.py --gemma3 models/gemma-3-270m-q4_k_m.gguf
       (only the gemma3 fixture; the trained ones would come out slightly different)
"""

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
CHUNK_LINES = 500
TRAIN_VOCAB = 2000

GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

HARD_STRINGS = [
    "",
    " ",
    "\n",
    "Hello world",
    " Hello world",
    "Hello, world! How's it going? I'm fine, don't worry; we'll see. THEY'RE HERE, it'S ok",
    "Numbers: 1234567 and 3.14159, 1,000,000 and 42nd 0x1F",
    "   multiple   spaces\n\n\nnewlines\t\ttabs \t \n mixed  \n",
    "Windows\r\nline\r\n\r\nendings\r\n",
    "Unicode: naïve café, Führer, Ελληνικά, русский текст, ½ months",
    "CJK: 日本語のテキスト 中文字符 한국어 텍스트",
    "Emoji: 🦙🚀👍🏽 👨‍👩‍👧 ✨ this is 🦙.cpp",
    "Combining: e\u0301 vs \u00e9, non\u00a0breaking\u2009thin\u3000ideographic",
    "Arabic and Hindi: مرحبا بالعالم नमस्ते दुनिया",
    "Code: def f(x):\n    return x**2  # comment\n\tif a != b: pass\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|endoftext|> end",
    "<s>Hello</s> <unk> text <s> x",
    "Added: visikv-rocks and <mask> tokens <mask>here",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    " = Robert Boulter = \r\n",
    "'s 'S 'll 'LL 'Re 've 'M 'd",
    "\u2581already\u2581has\u2581meta\u2581spaces",
    "<0x41> byte-looking text <0xFF>",
    "NFC: e\u0301 A\u030a \u212b \u1100\u1161\u11a8 a\u0323\u0302 a\u0302\u0323 \u0958 q\u0307\u0323",
]


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for byte in struct.pack(f"<{len(ids)}I", *ids):
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def wikitext_chunks(path):
    text = path.read_bytes().decode("utf-8")
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return ["".join(lines[i : i + CHUNK_LINES]) for i in range(0, len(lines), CHUNK_LINES)]


def expected_for(tok, source, chunks):
    strings = []
    for text in HARD_STRINGS:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids_special = tok.encode(text, add_special_tokens=True).ids
        strings.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": ids_special,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_with_special": tok.decode(ids_special, skip_special_tokens=False),
            }
        )
    encodings = tok.encode_batch(chunks, add_special_tokens=False)
    wiki = {
        "chunk_lines": CHUNK_LINES,
        "chunks": [
            {"count": len(e.ids), "fnv1a64": f"{fnv1a64(e.ids):016x}"} for e in encodings
        ],
        "first_chunk_ids": encodings[0].ids,
    }
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    return {"source": source, "vocab_size": vocab_size, "strings": strings, "wikitext": wiki}


def write_fixture(name, tok, source, chunks, save_json):
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    if save_json:
        tok.save(str(folder / "tokenizer.json"), pretty=False)
        # Reload what was written so the ids come from the committed file itself.
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = expected_for(tok, source, chunks)
    (folder / "expected.json").write_text(
        json.dumps(expected, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n",
        encoding="utf-8",
    )
    total = sum(c["count"] for c in expected["wikitext"]["chunks"])
    print(f"{name}: vocab {expected['vocab_size']}, {total} WikiText tokens")


def train_byte_level(train_file, split_pattern, special_tokens, ignore_merges=False, nfc=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAIN_VOCAB,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    return tok


def with_byte_tokens(tok, specials):
    """Rebuilds a trained SentencePiece-style BPE so that ids 0..2 are the specials and the next
    256 ids are the <0xXX> byte-fallback tokens, as in Llama-2's vocabulary."""
    data = json.loads(tok.to_str())
    old_vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = list(specials) + [f"<0x{b:02X}>" for b in range(256)]
    order += [t for t, _ in old_vocab if t not in order]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def train_spm(train_file, pre_tokenizer_kind):
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training always splits words at the metaspace so merges never cross words, as SentencePiece.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=TRAIN_VOCAB,
        special_tokens=specials,
        limit_alphabet=120,  # rarer characters fall back to bytes
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    tok = with_byte_tokens(tok, specials)
    if pre_tokenizer_kind == "legacy":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=True
        )
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def write_nfc_cases(path):
    """Random strings rich in combining marks, Hangul and composition exclusions, with the NFC
    form Python's unicodedata gives."""
    import random
    import unicodedata

    pools = [
        list(range(0x41, 0x5B)) + list(range(0x61, 0x7B)),
        list(range(0x300, 0x370)) + [0x323, 0x327, 0x328, 0x31B] + list(range(0x591, 0x5C8)),
        [0x93C, 0x94D, 0x9BC, 0x9BE, 0x9C7, 0x9D7, 0xB3E, 0xB47, 0xB56, 0xB57, 0x3099, 0x309A],
        list(range(0x1100, 0x1113)) + list(range(0x1161, 0x1176)) + list(range(0x11A8, 0x11C3)),
        list(range(0xAC00, 0xAC40)),
        list(range(0xC0, 0x180)) + list(range(0x1E00, 0x1F00)) + list(range(0x1F00, 0x2000)),
        list(range(0x958, 0x960)) + [0x2126, 0x212A, 0x212B, 0x340, 0x341, 0x343, 0x344, 0x374]
        + list(range(0xF900, 0xF910)) + [0x2ADC, 0x1D15E, 0x1D160],
        [0x304B, 0x30AB, 0x3046, 0x30A6, 0x4E2D, 0x20, 0x2E],
    ]
    rng = random.Random(7)
    cases = []
    for _ in range(400):
        text = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 10)))
        cases.append({"text": text, "nfc": unicodedata.normalize("NFC", text)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unicode_version": unicodedata.unidata_version, "cases": cases},
                               ensure_ascii=True) + "\n", encoding="utf-8")


def from_gguf(path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_str(hf.backend_tokenizer.to_str())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder with wikitext-103-test.txt, wikitext-2-valid-tokenized.txt "
                        "and tokenizers/ (default: ../shared/data)")
    parser.add_argument("--model", type=Path, help="the default model GGUF (SmolLM2-135M Q4_1)")
    parser.add_argument("--gemma3", type=Path, help="write only the gemma3 fixture, from this GGUF "
                        "(Gemma-3-270M Q4_K_M)")
    args = parser.parse_args()

    wikitext = args.data / "wikitext-103-test.txt"
    train_file = args.data / "wikitext-2-valid-tokenized.txt"
    vocabs = args.data / "tokenizers"
    for needed in (wikitext, train_file, vocabs):
        if not needed.exists():
            sys.exit(f"missing {needed} (pass --data)")
    chunks = wikitext_chunks(wikitext)
    if args.gemma3 is not None:
        # transformers' Gemma builder: user-defined tokens (runs of spaces, newlines, tabs, HTML
        # tags) stay whole, spaces become "▁", no prefix space, merges in vocabulary order.
        write_fixture("gemma3", from_gguf(args.gemma3), "gguf:gemma3-model", chunks, False)
        return
    write_nfc_cases(OUT / "nfc_cases.json")

    chat_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    gpt2 = train_byte_level(train_file, None, chat_specials)
    # One non-special added token, and a special one that swallows the spaces around it.
    gpt2.add_tokens([AddedToken("visikv-rocks", normalized=False)])
    gpt2.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=False)])
    write_fixture("gpt2_trained", gpt2, "tokenizer.json", chunks, True)

    qwen2 = train_byte_level(train_file, QWEN2_PATTERN, chat_specials, nfc=True)  # as Qwen2
    write_fixture("qwen2_trained", qwen2, "tokenizer.json", chunks, True)

    llama3_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    llama3 = train_byte_level(train_file, LLAMA3_PATTERN, llama3_specials, ignore_merges=True)
    llama3.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 0)],
            ),
        ]
    )
    write_fixture("llama3_trained", llama3, "tokenizer.json", chunks, True)

    write_fixture("spm_legacy_trained", train_spm(train_file, "legacy"), "tokenizer.json",
                  chunks, True)
    write_fixture("spm_metaspace_trained", train_spm(train_file, "metaspace"), "tokenizer.json",
                  chunks, True)

    write_fixture("gpt2_gguf", from_gguf(vocabs / "ggml-vocab-gpt-2.gguf"),
                  "gguf:ggml-vocab-gpt-2.gguf", chunks, False)
    llama = json.loads(from_gguf(vocabs / "ggml-vocab-llama-spm.gguf").to_str())
    llama["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    llama["pre_tokenizer"] = None
    write_fixture("llama_spm_gguf", Tokenizer.from_str(json.dumps(llama)),
                  "gguf:ggml-vocab-llama-spm.gguf", chunks, False)

    if args.model is None:
        print("smollm2: skipped (pass --model to regenerate)")
        return
    smol = json.loads(from_gguf(args.model).to_str())
    smol["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True},
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "t.json").write_text(json.dumps(smol), encoding="utf-8")
        smol_tok = Tokenizer.from_file(str(Path(tmp, "t.json")))
    write_fixture("smollm2", smol_tok, "tokenizer.json", chunks, True)


if __name__ == "__main__":
    main()
