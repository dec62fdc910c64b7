#!/usr/bin/env python3
"""Python baseline for the Rust tokenizer: unigram training and encoding throughput.

    python tokenizer_bench.py --train-text FILE --encode-text FILE --vocab-size N [--threads 2]

Each FILE is UTF-8 text, one document or line per line. Measured on this machine:

  * sentencepiece (C++) unigram training, settings of scripts/make_sp_golden.py (byte_fallback,
    nmt_nfkc, user-defined GLM symbols, no input sampling) but num_threads=--threads;
  * HF `tokenizers` (Rust) UnigramTrainer with a Metaspace pre-tokenizer (threads via
    RAYON_NUM_THREADS=--threads);
  * encoding throughput of both trained tokenizers over the encode text: sentencepiece
    `encode(list)` with num_threads=--threads and with num_threads=1, and a per-line loop;
    tokenizers `encode_batch` (and `encode_batch_fast` where present) and one-by-one `encode`.

stdout gets one JSON object per measurement and nothing else, e.g.
  {"tool": "sentencepiece", "what": "train", "seconds": 12.3, "mb_per_s": 0.41, ...}
MB is 10^6 bytes of UTF-8 input. Progress goes to stderr.

Requires: pip install sentencepiece==0.2.1 tokenizers
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time


USER_DEFINED = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<n>", "<|tab|>"]


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def emit(**row):
    print(json.dumps(row, ensure_ascii=False), flush=True)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    lines = [ln for ln in lines if ln.strip()]
    nbytes = sum(len(ln.encode("utf-8")) for ln in lines)
    return lines, nbytes


def best_of(repeat, fn):
    """Run fn() `repeat` times; return (min seconds, last result)."""
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-text", required=True)
    ap.add_argument("--encode-text", required=True)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="encoding runs; the fastest is reported")
    ap.add_argument("--skip", default="", help="comma list of tools to skip: sentencepiece,tokenizers")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    # tokenizers reads its thread count from the environment at first use
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    train_lines, train_bytes = read_lines(args.train_text)
    enc_lines, enc_bytes = read_lines(args.encode_text)
    log(f"train text: {len(train_lines)} lines {train_bytes / 1e6:.2f} MB; "
        f"encode text: {len(enc_lines)} lines {enc_bytes / 1e6:.2f} MB")
    common = {"vocab_size": args.vocab_size, "threads": args.threads,
              "python": platform.python_version(), "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="tokbench-") as tmp:
        # the same (non-empty, newline-stripped) lines go to both trainers
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(ln + "\n" for ln in train_lines)

        if "sentencepiece" not in skip:
            bench_sentencepiece(args, tmp, train_file, train_bytes, len(train_lines),
                                enc_lines, enc_bytes, common)
        if "tokenizers" not in skip:
            bench_tokenizers(args, train_file, train_bytes, len(train_lines),
                             enc_lines, enc_bytes, common)


def bench_sentencepiece(args, tmp, train_file, train_bytes, n_train, enc_lines, enc_bytes, common):
    import sentencepiece as spm
    ver = {"version": spm.__version__}
    prefix = os.path.join(tmp, "sp")
    log(f"sentencepiece {spm.__version__}: training unigram vocab {args.vocab_size} ...")
    spm.set_random_generator_seed(20240229)
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=train_file, model_prefix=prefix, model_type="unigram", vocab_size=args.vocab_size,
        byte_fallback=True, character_coverage=0.9995, user_defined_symbols=USER_DEFINED,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True,
        split_digits=False, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=args.threads, minloglevel=2)
    secs = time.perf_counter() - t0
    emit(tool="sentencepiece", what="train", seconds=round(secs, 3),
         mb_per_s=round(train_bytes / 1e6 / secs, 4), input_bytes=train_bytes, lines=n_train,
         model_bytes=os.path.getsize(prefix + ".model"), **common, **ver)

    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    runs = [("encode_batch", args.threads, lambda: sp.encode(enc_lines, out_type=int,
                                                             num_threads=args.threads)),
            ("encode_batch", 1, lambda: sp.encode(enc_lines, out_type=int, num_threads=1)),
            ("encode_loop", 1, lambda: [sp.encode(ln, out_type=int) for ln in enc_lines])]
    for what, threads, fn in runs:
        log(f"sentencepiece {what} threads={threads} ...")
        secs, ids = best_of(args.repeat, fn)
        ntok = sum(len(x) for x in ids)
        emit(tool="sentencepiece", what=what, seconds=round(secs, 4),
             mb_per_s=round(enc_bytes / 1e6 / secs, 3), tokens=ntok,
             tokens_per_s=round(ntok / secs), input_bytes=enc_bytes, lines=len(enc_lines),
             bytes_per_token=round(enc_bytes / max(ntok, 1), 3),
             **{**common, "threads": threads}, **ver)


def bench_tokenizers(args, train_file, train_bytes, n_train, enc_lines, enc_bytes, common):
    import tokenizers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    ver = {"version": tokenizers.__version__}

    def make(model):
        tok = Tokenizer(model)
        # close to sentencepiece's nmt_nfkc + remove_extra_whitespaces
        tok.normalizer = normalizers.Sequence([
            normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        # as in Llama's tokenizer.json: byte pieces back to UTF-8, drop the dummy-prefix space
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tok

    specials = ["<unk>", "<s>", "</s>"] + USER_DEFINED
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok = make(models.Unigram())
    # The trainer has no byte_fallback switch: the 256 byte pieces are reserved as special tokens
    # (they count against vocab_size as in sentencepiece) and byte_fallback is switched on in
    # the model rebuilt from the trained vocabulary below (not timed).
    trainer = trainers.UnigramTrainer(
        vocab_size=args.vocab_size, special_tokens=specials + byte_pieces, unk_token="<unk>",
        shrinking_factor=0.75, max_piece_length=16, n_sub_iterations=2, show_progress=False)
    log(f"tokenizers {tokenizers.__version__}: training unigram vocab {args.vocab_size} ...")
    t0 = time.perf_counter()
    try:
        tok.train([train_file], trainer)
    except Exception as e:  # e.g. more distinct chars than vocab_size (no character_coverage)
        log(f"tokenizers training failed: {e}")
        emit(tool="tokenizers", what="train", error=str(e), input_bytes=train_bytes,
             lines=n_train, **common, **ver)
        return
    secs = time.perf_counter() - t0
    trained_vocab = tok.get_vocab_size()
    emit(tool="tokenizers", what="train", seconds=round(secs, 3),
         mb_per_s=round(train_bytes / 1e6 / secs, 4), input_bytes=train_bytes, lines=n_train,
         trained_vocab_size=trained_vocab, **common, **ver)

    state = json.loads(tok.model.__getstate__())
    vocab = [tuple(x) for x in state["vocab"]]
    tok = make(models.Unigram(vocab, state.get("unk_id", 0), True))
    tok.add_special_tokens(specials)

    runs = [("encode_batch", args.threads,
             lambda: [e.ids for e in tok.encode_batch(enc_lines, add_special_tokens=False)])]
    if hasattr(tok, "encode_batch_fast"):
        runs.append(("encode_batch_fast", args.threads,
                     lambda: [e.ids for e in tok.encode_batch_fast(enc_lines,
                                                                   add_special_tokens=False)]))
    runs.append(("encode_loop", 1,
                 lambda: [tok.encode(ln, add_special_tokens=False).ids for ln in enc_lines]))
    for what, threads, fn in runs:
        log(f"tokenizers {what} ...")
        secs, ids = best_of(args.repeat, fn)
        ntok = sum(len(x) for x in ids)
        emit(tool="tokenizers", what=what, seconds=round(secs, 4),
             mb_per_s=round(enc_bytes / 1e6 / secs, 3), tokens=ntok,
             tokens_per_s=round(ntok / secs), input_bytes=enc_bytes, lines=len(enc_lines),
             bytes_per_token=round(enc_bytes / max(ntok, 1), 3),
             **{**common, "threads": threads}, **ver)


if __name__ == "__main__":
    main()
