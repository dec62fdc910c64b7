#!/usr/bin/env python3
"""Build the ChatGLM-6B tokenizer fixtures in fixtures/chatglm-tokenizer/ with the OFFICIAL code.

ChatGLM-6B's tokenizer is `ice_text.model` (icetk's SentencePiece unigram text model) plus
`tokenization_chatglm.py` (a Hugging Face slow tokenizer). The real ice_text.model is only an LFS
pointer in the offline mirror of huggingface.co/THUDM/chatglm-6b, so this script trains a small
model with the same structure and runs the official tokenizer code of both vocabulary layouts
over it:

  old/   pre-2023-04 layout (commit 23ad39b of THUDM/chatglm-6b): icetk's TextTokenizer over the
         plain text model; the 8 specials, <|tab|>, <|blank_2..80|> and 256 byte pieces are
         appended in code (`SPTokenizer._configure_tokenizer`); every id is offset by 20000 image
         tokens; tokenizer_config.json has no `num_image_tokens`.
  v1.1/  the layout of 2023-04-06 on (HEAD 8b7d335): plain sentencepiece over an ice_text.model
         that already holds the appended pieces; tokenizer_config.json has "num_image_tokens": 0.
         The v1.1 ice_text.model is made by running the old official `_configure_tokenizer` on the
         plain model and serializing its proto (inferred, see the README).
  v1.1-identity/  v1.1 again over a text model trained with the `identity` normalization rule:
         the released ice_text.model seems not to apply NFKC (ChatGLM-6B writes full-width
         punctuation such as "！" and "：", which an NFKC-trained vocabulary cannot hold), while
         old/ and v1.1/ use nmt_nfkc, sentencepiece's default.

Outputs, per layout directory: ice_text.model, tokenizer_config.json (verbatim from the official
revision), encodings.jsonl, decodes.jsonl, model_info.json (README.md beside them is written by
hand).

Setup (Python 3.11; nothing here is needed by the Rust build):

    python3 -m venv /tmp/chatglm-tok/venv
    /tmp/chatglm-tok/venv/bin/pip install transformers==4.27.1 tokenizers==0.13.3 \
        huggingface_hub==0.13.4 sentencepiece==0.1.99 protobuf==3.20.3 numpy==1.26.4
    /tmp/chatglm-tok/venv/bin/pip download --no-deps icetk==0.0.7 -d /tmp/chatglm-tok/dl
    /tmp/chatglm-tok/venv/bin/python scripts/make_chatglm_tok_fixture.py \
        --icetk-wheel /tmp/chatglm-tok/dl/icetk-0.0.7-py3-none-any.whl \
        --mirror /work/.mirror/greensheng+chatglm-6b/repo

`--mirror` is a git clone (bare is fine) of huggingface.co/THUDM/chatglm-6b; the two
tokenization_chatglm.py revisions and their tokenizer_config.json are read from it at run time
with `git show` (they are not copied into this repository). Only `icetk/text_tokenizer.py` and
`icetk/sentencepiece_model_pb2.py` of the icetk wheel are loaded (its __init__ imports torch for
the image tokenizer, which the text path does not need).

The training text is the committed corpus sample (assets/corpus/train.jsonl.gz), test strings
come from assets/corpus/heldout.jsonl.gz plus hand-written cases. Everything is deterministic
(hash-ordered selection, one training thread, fixed seed): two runs give byte-identical files.
"""

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SEED = "glm-chatglm-tok-v1"
RANDOM_SEED = 20230406
ICETK_WHEEL_SHA256 = "830eaa0acdaa0c1f3be3b8da820f5731b3960dba27c6ab19f6810a68ad193fa8"

# THUDM/chatglm-6b revisions (the mirror's commit ids)
OLD_COMMIT = "23ad39b"   # 2023-04-05 "Fix decode method for torch tensor": last icetk-based code
V11_COMMIT = "8b7d335"   # HEAD, 2023-09-04; tokenizer code of 2023-05-08 (4d0fc39)

EN_TRAIN_BYTES = 1_500_000
ZH_TRAIN_BYTES = 1_500_000
CHUNK_MAX_CHARS = {"en": 600, "zh": 300}
# modern Chinese only: classical poetry would need ~6,000 characters at this coverage
ZH_SOURCES = ("inews", "peoples-daily-1998")

# icetk's text model: <unk> 0, <s> 1, </s> 2, <pad> 3, <n> 4 (a user-defined symbol), then text
# pieces. It has no byte pieces: ChatGLM appends those (the v1.1 file is 6,323 bytes larger
# than the pre-2023-04 one, exactly the appended pieces plus trainer_spec.byte_fallback).
TRAINER_ARGS = dict(
    model_type="unigram",
    vocab_size=4000,
    # byte_fallback stays unset (false): icetk's model predates it, and the code sets it
    character_coverage=0.995,
    user_defined_symbols=["<n>"],
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=True,
    remove_extra_whitespaces=True,
    split_digits=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    # determinism: every sentence, in file order, one thread
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    max_sentence_length=4192,
    seed_sentencepiece_size=1_000_000,
    shrinking_factor=0.75,
    num_sub_iterations=2,
    max_sentencepiece_length=16,
)

def trainer_args(rule):
    return dict(TRAINER_ARGS, normalization_rule_name=rule)


# fixture directory -> (official code, normalization rule of the text model)
LAYOUTS = {"old": ("old", "nmt_nfkc"), "v1.1": ("v1.1", "nmt_nfkc"), "v1.1-identity": ("v1.1", "identity")}

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def hkey(*parts):
    return hashlib.sha256("\x1f".join((SEED,) + tuple(str(p) for p in parts)).encode()).hexdigest()


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------------
# text

def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def chunk(paragraph, limit):
    """Cut a paragraph into pieces of at most `limit` characters, at spaces where possible."""
    out = []
    while len(paragraph) > limit:
        cut = paragraph.rfind(" ", limit // 2, limit)
        cut = limit if cut < 0 else cut
        out.append(paragraph[:cut].strip())
        paragraph = paragraph[cut:].strip()
    if paragraph:
        out.append(paragraph)
    return [p for p in out if p]


def training_lines(docs):
    """(lang -> [line]) in hash order until the byte budgets, returned in document order."""
    items = {"en": [], "zh": []}
    for i, d in enumerate(docs):
        if d["lang"] == "zh" and d["source"] not in ZH_SOURCES:
            continue
        for j, para in enumerate(d["text"].split("\n")):
            for k, ln in enumerate(chunk(" ".join(para.split()), CHUNK_MAX_CHARS[d["lang"]])):
                if len(ln) >= 8:
                    items[d["lang"]].append((f"{i}:{j}:{k}", ln))
    out = {}
    for lang, budget in (("en", EN_TRAIN_BYTES), ("zh", ZH_TRAIN_BYTES)):
        order = sorted(range(len(items[lang])), key=lambda n: hkey("train", lang, items[lang][n][0]))
        chosen, total = [], 0
        for n in order:
            if total >= budget:
                break
            chosen.append(n)
            total += len(items[lang][n][1].encode("utf-8")) + 1
        out[lang] = [items[lang][n][1] for n in sorted(chosen)]
    return out


def heldout_snippets(docs, lang, n, max_chars):
    """n snippets of held-out documents (newlines kept), each at most max_chars characters."""
    cands = [(i, d["text"]) for i, d in enumerate(docs) if d["lang"] == lang and len(d["text"]) >= 40]
    cands.sort(key=lambda kv: hkey("test", lang, kv[0]))
    out = []
    for i, text in cands[:n]:
        start = int(hkey("start", lang, i)[:8], 16) % max(1, len(text) - max_chars)
        out.append(text[start:start + max_chars])
    return out


def crafted_tests():
    t = [
        # empty and whitespace
        "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\t\t", "\r\n",
        " hello", "  hello", "hello ", "hello  ", "  both ends  ", "a b", "a  b", "a   b",
        "tab\tseparated\tvalues", "x\t \ty", "\tleading tab", "trailing tab\t",
        "line one\nline two\n\nline four", "a \n b", "a\n b", "a \nb", "\n leading newline",
        "trailing newline\n", "\r\nCRLF line\r\n", "\u3000ideographic space\u3000here",
        "non\u00a0breaking\u00a0space", "zero\u200bwidth\u200bspace",
        "def main():\n    print('hello world')\t# greeting",
        "if x:\n\tif y:\n\t\treturn 1\n        # eight spaces\n",
        "```python\nfor i in range(10):\n    print(i)\n```",
        # the literal marks of the preprocessing
        "a<n>b", "<n>", "col1<|tab|>col2", "x<|blank_3|>y", "<|blank_81|>", "<|blank_1|>",
        "<0x41> is a byte piece name", "<image_5> is not text", "<s> and </s> and <unk> and <pad>",
        "\u2581", "\u2581\u2581 double \u2581\u2581", "a\u2581b",
        # the specials inside text, with and without spaces around them
        "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "</s>", "<unk>", "<pad>", "<s>",
        "<unused_0>", "<ENC>", "<dBLOCK>",
        "今天[MASK]天气很好", "今天 [MASK] 天气很好", "今天  [MASK]  天气很好",
        "The capital of France is [MASK].", "The capital of France is [MASK] .",
        "[gMASK] at start", "end [gMASK]", "a[gMASK]b", "a [gMASK] b",
        "[sMASK] span [sMASK]", "x <sop> y <eop> z", "x<sop>y<eop>z", "<sop><eop>",
        "  <sop>  leading spaces", "trailing spaces  <eop>  ", "line\n<sop>\nline",
        "tab\t<eop>\ttab", "[MASK][MASK][sMASK]", "[MASK] [MASK]", " [MASK] ",
        "\u3000[MASK]\u3000", "nbsp\u00a0<sop>\u00a0nbsp", "\x1c[MASK]\x1f separators",
        "\x1c\x1d\x1e\x1f alone", "nel\x85<sop>\x85nel", "a\u3000\u3000\u3000b", "cr\ronly",
        "\u2581<sop>\u2581", "\u2028[MASK]\u2029", "a</s>b", "a </s> b", "<unk><pad>", "x <pad> y", "<unused_0> eod",
        "[gmask] lower case", "[ MASK ]", "<sop", "sop>", "<<sop>>", "[[MASK]]",
        "问题：[MASK]是中国的首都。", "[gMASK]<sop>你好<eop>",
        # runs of spaces of every interesting length
    ]
    for k in (2, 3, 4, 7, 8, 16, 32, 79, 80, 81, 82, 100, 159, 160, 161, 162, 240):
        t.append("a" + " " * k + "b")
    t += [" " * 5 + "indented", "end" + " " * 5, " " * 100, "\n" + " " * 100 + "\n",
          "x" + " " * 81 + "\n" + " " * 3 + "y"]
    t += [
        # byte fallback: emoji, rare characters, other scripts, controls
        "你好👋！", "I love 🍕 and 🚀!", "👍🏽 skin tone", "👨‍👩‍👧 family", "🇨🇳🇺🇸 flags",
        "❤️ heart", "𠀀𠀁𠮷 extension B", "𪚥 rare", "鿰 new ideograph", "Привет, мир!",
        "مرحبا بالعالم", "สวัสดีชาวโลก", "Γειά σου κόσμε", "こんにちは世界", "안녕하세요 세계",
        "null\x00byte", "bell\x07char", "esc\x1b[31mred\x1b[0m", "del\x7fchar", "c1\x85next",
        "soft\u00adhyphen", "\ufeffBOM at start", "\ufffd replacement char",
        "\U0001d400\U0001d401 math bold", "cafe\u0301 vs caf\u00e9",
        # NFKC
        "ＡＢＣ ａｂｃ １２３", "①②③", "ﬁnance ﬂow", "ﾊﾝｶｸ ｶﾀｶﾅ", "㍻ ㎏ ㎡", "全角！？（）：；，",
        # HF decode clean-up triggers (" ." " ?" " !" " ," " ' " " n't" " 'm" " 's" " 've" " 're")
        "Hello , world !", "Is it ? Yes .", "isn 't it", "I 'm here", "it 's fine",
        "we 've been", "they 're here", "a ' b", "wait ... what ?", "3 . 14", "end .",
        # mixed
        "GLM-130B是一个开源的双语(中文和英文)双向稠密模型。", "我用Python写了一个tokenizer，速度很快。",
        "OpenAI的GPT-4和清华的ChatGLM-6B", "北京 Beijing 上海 Shanghai", "这是English混合中文的句子",
        "The 中国 economy grew 5.2% in 2023年。", "「引号」『书名』《论语》", "……——·～",
        "1234567890", "3.14159 2,718 1e-10", "http://www.example.com/path?q=1&b=2#frag",
        "{\"json\": [1, 2, 3]}", "<html><body>Hello</body></html>", "a", "中", "A" * 40, "哈" * 40,
        # ChatGLM chat prompts (ChatGLM-6B `chat`: "[Round i]\n问：q\n答：a\n" ... "答：")
        "你好",
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n"
        "[Round 1]\n问：晚上睡不着应该怎么办\n答：",
        "[Round 0]\n问：介绍一下清华大学\n答：",
        "[Round 0]\n问：What is the capital of France?\n答：The capital of France is Paris.\n"
        "[Round 1]\n问：And of Germany?\n答：",
        "[Round 0]\n问：写一段Python代码\n答：```python\ndef add(a, b):\n    return a + b\n```\n"
        "[Round 1]\n问：加上注释\n答：",
    ]
    return t


def build_tests(heldout):
    tests = crafted_tests()
    en = heldout_snippets(heldout, "en", 30, 300)
    zh = heldout_snippets(heldout, "zh", 30, 200)
    tests += en + zh
    for i in range(8):
        tests.append(en[i][:100] + " " + zh[i][:80])
    tests += heldout_snippets(heldout, "en", 1, 2000) + heldout_snippets(heldout, "zh", 1, 1000)
    out, seen = [], set()
    for t in tests:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# the official code

def git_show(mirror, commit, path):
    return subprocess.run(["git", "-C", mirror, "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout


def git_rev(mirror, commit, path=None):
    args = ["git", "-C", mirror, "rev-parse", commit if path is None else f"{commit}:{path}"]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def load_icetk(wheel, tmp):
    """Loads icetk.text_tokenizer and icetk.sentencepiece_model_pb2 from the wheel, without
    running icetk/__init__.py (which imports torch for the image tokenizer)."""
    with open(wheel, "rb") as f:
        blob = f.read()
    if sha256_bytes(blob) != ICETK_WHEEL_SHA256:
        sys.exit(f"{wheel}: SHA-256 {sha256_bytes(blob)} is not icetk 0.0.7's {ICETK_WHEEL_SHA256}")
    pkg = os.path.join(tmp, "icetk")
    os.makedirs(pkg, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in ("text_tokenizer.py", "sentencepiece_model_pb2.py"):
            with open(os.path.join(pkg, name), "wb") as f:
                f.write(zf.read(f"icetk/{name}"))
    stub = types.ModuleType("icetk")
    stub.__path__ = [pkg]
    sys.modules["icetk"] = stub
    import icetk.text_tokenizer  # noqa: F401
    import icetk.sentencepiece_model_pb2  # noqa: F401


def load_module(name, source, tmp):
    path = os.path.join(tmp, f"{name}.py")
    with open(path, "wb") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# ModelProto reading (for model_info.json)

PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


def piece_summary(blob):
    from icetk import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(blob)
    counts = {}
    for p in m.pieces:
        counts[PIECE_TYPES[p.type]] = counts.get(PIECE_TYPES[p.type], 0) + 1
    user = [[i, p.piece] for i, p in enumerate(m.pieces) if p.type == 4]
    byte_ids = [i for i, p in enumerate(m.pieces) if p.type == 6]
    return m, {
        "pieces": len(m.pieces),
        "piece_type_counts": counts,
        "first_pieces": [[i, p.piece, PIECE_TYPES[p.type]] for i, p in enumerate(m.pieces[:6])],
        "control_pieces": [[i, p.piece] for i, p in enumerate(m.pieces) if p.type == 3],
        "user_defined_pieces": {"count": len(user), "first": user[:3], "last": user[-1:]},
        "byte_pieces_range": [byte_ids[0], byte_ids[-1]] if byte_ids else None,
        "trainer_spec": {"byte_fallback": m.trainer_spec.byte_fallback,
                         "unk_id": m.trainer_spec.unk_id, "bos_id": m.trainer_spec.bos_id,
                         "eos_id": m.trainer_spec.eos_id, "pad_id": m.trainer_spec.pad_id},
        "normalizer": {"name": m.normalizer_spec.name,
                       "add_dummy_prefix": m.normalizer_spec.add_dummy_prefix,
                       "remove_extra_whitespaces": m.normalizer_spec.remove_extra_whitespaces,
                       "escape_whitespaces": m.normalizer_spec.escape_whitespaces},
    }


# --------------------------------------------------------------------------------------------

def decode_cases(tok, layout, vocab_size):
    """Id lists to decode: generated-looking ones, edge cases, and seeded random ones."""
    sp = tok.sp_tokenizer
    pid = lambda piece: sp[piece]  # noqa: E731  (offset included)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    mask, gmask, smask, eod, sop, eop, enc_, dblock = (pid(s) for s in SPECIALS)
    pad, unk, end = pid("<pad>"), pid("<unk>"), pid("</s>")
    byte = lambda b: pid("<0x%02X>" % b)  # noqa: E731
    cases = [
        ([], "empty"),
        (enc("你好") + [gmask, sop] + enc("你好👋！我是人工智能助手 ChatGLM-6B。") + [eop], "chat turn"),
        ([gmask, sop] + enc("Paris is the capital of France.") + [eop], "generation with [gMASK] <sop>"),
        ([pad, pad, pad] + enc("left padded") + [gmask, sop] + enc("answer") + [eop], "left padding"),
        (enc("a") + [pad] + enc("b"), "pad in the middle"),
        ([mask, gmask, smask, eod, sop, eop, enc_, dblock], "all specials"),
        (enc("x") + [mask, gmask, smask, eod, sop, eop, enc_, dblock] + enc("y"), "specials between text"),
        ([sop] + enc("hello"), "control piece first"),
        ([unk], "<unk>"), ([unk] + enc("hello") + [unk], "<unk> around text"),
        ([end], "</s>"), (enc("a") + [end] + enc("b"), "</s> in text"), ([pid("<s>")], "<s>"),
        ([pid("<n>")], "<n>"), ([pid("<n>")] + enc("hello"), "<n> first"),
        ([pid("<|tab|>"), pid("<|blank_4|>")] + enc("x"), "tab and blank first"),
        ([pid("<|blank_80|>"), pid("<|blank_80|>"), pid("<|blank_2|>")], "blanks only"),
        ([byte(b) for b in "👋".encode()], "emoji bytes"),
        ([byte(b) for b in "👋".encode()[:2]], "truncated emoji"),
        ([byte(b) for b in "👋".encode()[:3]] + enc("x"), "truncated emoji before text"),
        ([byte(0xF0), byte(0x9F), sop, byte(0x91), byte(0x8B)], "control piece inside a character"),
        ([byte(0x80)], "lone continuation byte"), ([byte(0xC0), byte(0x80)], "overlong"),
        ([byte(0xED), byte(0xA0), byte(0x80)], "surrogate"),
        ([byte(0xF4), byte(0x90), byte(0x80), byte(0x80)], "above U+10FFFF"),
        ([byte(0xEF), byte(0xBF), byte(0xBD)], "U+FFFD bytes"),
        ([byte(b) for b in b"<n>"], "bytes spelling <n>"),
        ([byte(b) for b in b"a<|blank_3|>b<|tab|>"], "bytes spelling blank and tab"),
        ([byte(0x20)] + enc("x"), "space byte first"),
        ([pid("\u2581"), pid("\u2581")] + enc("hello"), "lone meta-space pieces first"),
        (enc("hello") + [pid("\u2581"), pid("\u2581")], "lone meta-space pieces last"),
        (enc("Hello") + [pid("\u2581,")] if pid("\u2581,") != unk else enc("Hello"), "space comma"),
    ]
    if layout == "old":
        cases += [([0, 5, 19999] + enc("image ids are dropped"), "image ids"),
                  (enc("a") + [12345] + enc("b"), "image id inside text")]
    rng = random.Random(RANDOM_SEED)
    for n in range(40):
        lo = 20000 if layout == "old" and n < 30 else 0
        ids = [rng.randrange(lo, vocab_size) for _ in range(rng.randrange(1, 25))]
        cases.append((ids, f"random {n}"))
    for n in range(20):  # random ids from the appended region (specials, marks, bytes)
        top = vocab_size - 344
        ids = [rng.randrange(top, vocab_size) for _ in range(rng.randrange(1, 12))]
        cases.append((ids, f"random appended {n}"))
    return cases


def run_layout(name, tok, tests, out_dir):
    rows = []
    for t in tests:
        tokens = tok.tokenize(t)
        ids = tok.encode(t, add_special_tokens=False)
        full = tok.encode(t)
        assert tok.convert_tokens_to_ids(tokens) == ids, (name, t)
        rows.append({"text": t, "tokens": tokens, "ids": ids, "ids_with_special": full,
                     "decoded": tok.decode(ids), "decoded_with_special": tok.decode(full)})
    with open(os.path.join(out_dir, "encodings.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    dec = []
    for ids, note in decode_cases(tok, name, tok.vocab_size):
        dec.append({"note": note, "ids": ids, "decoded": tok.decode(ids)})
    with open(os.path.join(out_dir, "decodes.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for r in dec:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows), len(dec)


def official_ids(tok):
    sp = tok.sp_tokenizer
    ids = {s: sp[s] for s in SPECIALS + ["<|tab|>", "<|blank_2|>", "<|blank_80|>", "<0x00>", "<0xFF>",
                                        "<unk>", "<s>", "</s>", "<pad>", "<n>"]}
    hf = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}
    hf_ids = {k + "_id": getattr(tok, k + "_id") for k in ("bos_token", "eos_token", "unk_token",
                                                          "pad_token", "mask_token")}
    return {"piece_ids": ids, "hf_special_tokens": hf, "hf_special_token_ids": hf_ids,
            "hf_no_split_tokens": sorted(tok.unique_no_split_tokens),
            "hf_added_tokens": dict(tok.added_tokens_encoder), "vocab_size": tok.vocab_size,
            "num_image_tokens": sp.num_image_tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirror", default="/work/.mirror/greensheng+chatglm-6b/repo",
                    help="git clone of huggingface.co/THUDM/chatglm-6b")
    ap.add_argument("--icetk-wheel", required=True, help="icetk-0.0.7-py3-none-any.whl")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "assets", "corpus"))
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "chatglm-tokenizer"))
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"

    import google.protobuf
    import sentencepiece as spm
    import transformers
    if transformers.__version__ != "4.27.1":
        sys.exit(f"transformers {transformers.__version__}: the official code needs 4.27.1")
    transformers.logging.set_verbosity_error()

    out = os.path.abspath(args.out)
    dirs = {layout: os.path.join(out, layout) for layout in LAYOUTS}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    docs = read_jsonl_gz(os.path.join(args.corpus, "train.jsonl.gz"))
    heldout = read_jsonl_gz(os.path.join(args.corpus, "heldout.jsonl.gz"))
    lines = training_lines(docs)
    print(f"[text] en {len(lines['en'])} lines, zh {len(lines['zh'])} lines", file=sys.stderr)

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="glm-chatglm-") as tmp:
        # 1. the plain text models (relative paths: TrainerSpec stores them in the model)
        plain = {}
        os.chdir(tmp)
        try:
            with open("train.txt", "w", encoding="utf-8", newline="\n") as f:
                for ln in lines["en"] + lines["zh"]:
                    f.write(ln + "\n")
            for rule in ("nmt_nfkc", "identity"):
                spm.set_random_generator_seed(RANDOM_SEED)
                spm.SentencePieceTrainer.train(input="train.txt", model_prefix="ice_text",
                                               minloglevel=2, **trainer_args(rule))
                with open("ice_text.model", "rb") as f:
                    plain[rule] = f.read()
        finally:
            os.chdir(cwd)

        # 2. the official code of both revisions
        load_icetk(args.icetk_wheel, tmp)
        old_mod = load_module("tokenization_chatglm_old",
                              git_show(args.mirror, OLD_COMMIT, "tokenization_chatglm.py"), tmp)
        v11_mod = load_module("tokenization_chatglm_v11",
                              git_show(args.mirror, V11_COMMIT, "tokenization_chatglm.py"), tmp)

        # 3. v1.1 ice_text.model files: the old code's configured proto, serialized (inferred)
        from icetk.text_tokenizer import TextTokenizer
        configured = {}
        for rule, blob in plain.items():
            path = os.path.join(tmp, f"plain-{rule}.model")
            with open(path, "wb") as f:
                f.write(blob)
            tt = TextTokenizer(path)
            old_mod.SPTokenizer._configure_tokenizer(tt, SPECIALS, 80, True, encode_special_tokens=False)
            configured[rule] = tt.proto.SerializeToString()

        tests = build_tests(heldout)
        for layout, (code, rule) in LAYOUTS.items():
            blob = plain[rule] if code == "old" else configured[rule]
            commit = OLD_COMMIT if code == "old" else V11_COMMIT
            with open(os.path.join(dirs[layout], "ice_text.model"), "wb") as f:
                f.write(blob)
            with open(os.path.join(dirs[layout], "tokenizer_config.json"), "wb") as f:
                f.write(git_show(args.mirror, commit, "tokenizer_config.json"))

            # 4. run the official tokenizer
            mod = old_mod if code == "old" else v11_mod
            tok = mod.ChatGLMTokenizer.from_pretrained(dirs[layout])
            n_enc, n_dec = run_layout(code, tok, tests, dirs[layout])
            _, summary = piece_summary(blob)
            info = {
                "layout": layout,
                "code": code,
                "official_revision": {
                    "repository": "huggingface.co/THUDM/chatglm-6b",
                    "commit": git_rev(args.mirror, commit),
                    "tokenization_chatglm.py_blob": git_rev(args.mirror, commit, "tokenization_chatglm.py"),
                    "tokenizer_config.json_blob": git_rev(args.mirror, commit, "tokenizer_config.json"),
                },
                "ice_text.model": {"bytes": len(blob), "sha256": sha256_bytes(blob), **summary},
                "official": official_ids(tok),
                "plain_model": {"normalization_rule_name": rule, "bytes": len(plain[rule]),
                                "sha256": sha256_bytes(plain[rule])},
                "versions": {"python": sys.version.split()[0], "transformers": transformers.__version__,
                             "sentencepiece": spm.__version__, "protobuf": google.protobuf.__version__,
                             "icetk": "0.0.7 (text_tokenizer.py, sentencepiece_model_pb2.py)"},
                "tests": {"encodings": n_enc, "decodes": n_dec},
            }
            if code == "v1.1":
                info["ice_text.model"]["bytes_added_to_plain_model"] = len(blob) - len(plain[rule])
                info["ice_text.model"]["real_files_bytes_added"] = 2706249 - 2699926
            if layout == "old":
                info["plain_model"].update({
                    "trainer_args": trainer_args(rule), "random_seed": RANDOM_SEED,
                    "training_text": {"source": "assets/corpus/train.jsonl.gz", "en_lines": len(lines["en"]),
                                      "zh_lines": len(lines["zh"])}})
            with open(os.path.join(dirs[layout], "model_info.json"), "w", encoding="utf-8", newline="\n") as f:
                json.dump(info, f, ensure_ascii=False, indent=1)
                f.write("\n")
            print(f"[done] {layout}: {n_enc} encodings, {n_dec} decodes, model {len(blob)} B", file=sys.stderr)

if __name__ == "__main__":
    main()
