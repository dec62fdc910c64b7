#!/usr/bin/env python3
"""Build fixtures/import/: tiny GLM-130B and ChatGLM-6B checkpoints in the OFFICIAL on-disk formats, written by
the OFFICIAL code, plus the logits the official models give on them. The Rust importers are tested against these.

What is made (see fixtures/import/README.md for the details and the manifest for every tensor name and shape):
  sat_tp1/ sat_tp2/ sat_tp4/          GLM-130B SwissArmyTransformer checkpoints: `latest` + 49300/mp_rank_XX_model_states.pt
                                      (tp1 saved as SAT saves; tp2/tp4 by GLM-130B's tools/convert_tp.py, unmodified)
  sat_int4_tp2/ sat_int8_tp2/         convert_tp.py --target-tp 2 --quantization-bit-width 4/8 (GPU steps reproduced on CPU)
  sat.io.safetensors                  inputs + official SAT GLM130B logits (f32; fp16 weights upcast; int4/int8 dequantized)
  hf_bin/ hf_safetensors/             ChatGLM-6B (HF repo code at 8b7d335) save_pretrained: .bin shards / .safetensors shards
  hf_int4/ hf_int8/                   the same model after the official quantization.py quantize(4/8), save_pretrained
  chatglm.io.safetensors              inputs, the official model's own position ids, logits (f32, int4, int8)
  configs/                            official config.json / tokenizer_config.json of chatglm-6b v1.1 and pre-2023-04
  manifest.json                       revisions, configs, cases, every checkpoint's keys/dtypes/shapes, checks, CPU notes

Nothing official is copied into this repository: the official files are exported at run time from git mirrors into a
temporary folder and run from there.

Environment (exact commands; torch comes from Debian, everything else from PyPI into --target folders, no second torch):
  apt-get install --no-install-recommends -y python3-torch python3-numpy python3-requests python3-yaml \\
      python3-typing-extensions                       # torch 1.13.1+dfsg (reports 1.13.0a0), numpy 1.24.2
  E=~/.cache/glm-rs/import-fixtures
  /usr/bin/python3 -m pip install --no-deps --target $E/satenv SwissArmyTransformer==0.4.12 einops==0.6.0 \\
      tqdm==4.65.0 filelock==3.10.0 packaging==23.0 regex==2023.3.23
  /usr/bin/python3 -m pip install --no-deps --target $E/hfenv transformers==4.27.1 huggingface_hub==0.13.3 \\
      tokenizers==0.13.3 safetensors==0.3.1 tqdm==4.65.0 filelock==3.10.0 packaging==23.0 regex==2023.3.23
  Official sources (bare git mirrors; plain clones work too):
    github.com/THUDM/GLM-130B at 212215c                       -> --glm130b-repo (default /work/.mirror/THUDM+GLM-130B/repo)
    huggingface.co/THUDM/chatglm-6b at 8b7d335 (LFS not needed) -> --chatglm-repo (default /work/.mirror/greensheng+chatglm-6b/repo)

Run (from the repository root):
  /usr/bin/python3 scripts/make_import_fixtures.py                       # writes fixtures/import/
  /usr/bin/python3 scripts/make_import_fixtures.py --verify-determinism  # ... then builds it all again and compares bytes

Each stage runs in its own process with its own PYTHONPATH (SAT with tiny import stubs; convert_tp.py with nothing added;
ChatGLM with transformers 4.27.1). Every check below prints "CHECK ... ok" or stops the script with an error.

Findings the importers must know (details in the README and manifest): ChatGLM's HF code uses DeepNorm alpha
sqrt(2*28) whatever num_layers is (so the 2-layer ChatGLM logits use 7.4833); its RoPE inv_freq is fp16-rounded;
convert_tp.py splits SAT 0.4.12's `mixins.rotary-embedding.rotary_emb.inv_freq` like a vocab-parallel tensor; the HF
release config lets from_pretrained tie lm_head to the embedding (these fixtures set tie_word_embeddings=false).

GPU-only steps reproduced on CPU (search for "CPU REPRODUCTION" in this file):
  A. cuda_arithmetic_on_cpu(): the quantizer's tensor arithmetic as CUDA does it in fp16 (used for convert_tp.py's
     --quantization-bit-width and for ChatGLM's quantization.py quantize); Tensor.cuda() is the identity.
  B. compress_int4_weight_cpu(): GLM-130B cuda/quantization.cu int4WeightCompression (same kernel in cpm_kernels form
     inside ChatGLM's quantization.py).
  C. extract_weight_float_cpu(): int4/int8WeightExtractionFloat (q.float() * scale.float(), int4 high nibble first,
     sign-extended), used to dequantize for the f32 logits.
"""

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import runpy
import shutil
import struct
import subprocess
import sys
import tempfile
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENV_DIR = os.path.expanduser("~/.cache/glm-rs/import-fixtures")

GLM130B_COMMIT = "212215c"
CHATGLM_COMMIT = "8b7d335"
CHATGLM_OLD_CONFIG_COMMIT = "2200e2b"  # last commit touching config.json before 63ce1ba ("Update code for slim", 2023-04-06)
ITERATION = "49300"  # the GLM-130B release's `latest`

# Tiny GLM-130B (SAT GLM130B): GeGLU, so dense_h_to_4h has 2 * inner_hidden_size rows.
GLM130B_CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, vocab_size=160,
                   max_sequence_length=64, layernorm_epsilon=1e-5, position_encoding_2d=False,
                   mask_id=150, gmask_id=151, smask_id=152, eod_id=153, sop_id=154, eop_id=155)
GLM130B_SEED, GLM130B_STD = 130, 0.05

# Tiny ChatGLM-6B (ChatGLMConfig of configuration_chatglm.py at 8b7d335).
CHATGLM_CFG = dict(vocab_size=160, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
                   max_sequence_length=64, layernorm_epsilon=1e-5, position_encoding_2d=True, mask_token_id=150,
                   gmask_token_id=151, bos_token_id=154, eos_token_id=155, pad_token_id=3, use_cache=True,
                   tie_word_embeddings=False)
CHATGLM_SEED, CHATGLM_STD = 6, 0.05
# release auto_map, copied into the tiny config so config.json looks like the release's (no code files are saved)
CHATGLM_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
HF_MAX_SHARD_SIZE = 80_000  # bytes: gives 3 shards (2 layers of ~98 KB fp16 each + embeddings + lm_head)

GENERATED = ["sat_tp1", "sat_tp2", "sat_tp4", "sat_int4_tp2", "sat_int8_tp2", "sat.io.safetensors", "hf_bin",
             "hf_safetensors", "hf_int4", "hf_int8", "chatglm.io.safetensors", "configs", "manifest.json"]


def log(*a):
    print(*a, flush=True)


def fail(msg):
    raise SystemExit("FAILED: " + msg)


def check(ok, what):
    if not ok:
        fail(what)
    log(f"CHECK {what}: ok")


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------

def save_safetensors(path, tensors):
    """safetensors writer of shared/golden/make_golden.py: F32 floats / I64 ids, keys in insertion order, header JSON
    without spaces padded with spaces to a multiple of 8 bytes. Deterministic byte for byte."""
    import numpy as np
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        a = t.detach().cpu().contiguous().numpy()
        dt = {np.float32: "F32", np.int64: "I64"}[a.dtype.type]
        b = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def git(repo, *args):
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True).stdout


def tensor_table(sd):
    return [[k, str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sd.items()]


def zip_entries(path):
    with zipfile.ZipFile(path) as z:
        return [i.filename for i in z.infolist()]


def init_(model, seed, std):
    """make_golden.py's init: LayerNorm weights 1 + std*N(0,1), every other parameter (biases included) std*N(0,1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n and n.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------------
# CPU REPRODUCTIONS of the GPU-only steps
# ----------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cuda_arithmetic_on_cpu():
    """CPU REPRODUCTION A. The official quantizers (GLM-130B tools/convert_tp.py merge_weights and ChatGLM-6B
    quantization.py QuantizedLinear) do, on an fp16 CUDA tensor w:
        scale = (w.abs().max(dim=-1).values / (2**(b-1) - 1)).half();  q = torch.round(w / scale[:, None]).to(torch.int8)
    Here `.cuda()` / `.to(torch.cuda.current_device())` stay on the CPU and the two fp16 operations whose CPU results
    could differ from CUDA's are computed exactly as PyTorch's CUDA kernels compute them (float32 "opmath", one rounding
    to fp16 at the end, round-to-nearest-even):
      * fp16 tensor / Python number: CUDA's div_true_kernel_cuda sees a CPU scalar divisor and multiplies by its
        reciprocal, inv = 1.0f / float(b) in float32, result = half(float(a) * inv). (CPU torch 1.13 divides a / half(b)
        instead, which can differ in the last fp16 bit; we count how often on our weights and record it.)
      * fp16 tensor / fp16 tensor: half(float(a) / float(b)).
      * torch.round(fp16): half(nearbyint(float(a))) (round half to even); CPU torch 1.13 has no Half round at all.
    abs, max, .half() on an fp16 tensor and .to(int8) of integral fp16 values are exact and run as they are."""
    import torch
    orig_div, orig_round = torch.Tensor.__truediv__, torch.round
    orig_cuda, orig_cur = torch.Tensor.cuda, torch.cuda.current_device

    def truediv(a, b):
        if a.dtype == torch.float16 and isinstance(b, (int, float)) and not isinstance(b, bool):
            inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(b), dtype=torch.float32)
            return (a.float() * inv).half()
        if a.dtype == torch.float16 and isinstance(b, torch.Tensor) and b.dtype == torch.float16:
            return (a.float() / b.float()).half()
        return orig_div(a, b)

    def round_(x, *a, **k):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float16 and not a and not k:
            return orig_round(x.float()).half()
        return orig_round(x, *a, **k)

    torch.Tensor.__truediv__ = truediv
    torch.round = round_
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.Tensor.__truediv__, torch.round = orig_div, orig_round
        torch.Tensor.cuda, torch.cuda.current_device = orig_cuda, orig_cur


def compress_int4_weight_cpu(weight):
    """CPU REPRODUCTION B. cuda/quantization.cu int4WeightCompression on an int8 [n, m] tensor of values in [-8, 7]:
    out[r, j] = (in[r, 2j] << 4) | (in[r, 2j+1] & 0x0F), stored as int8: the high nibble is the even column."""
    import numpy as np
    import torch
    q = weight.detach().cpu().numpy().astype(np.int32)
    n, m = q.shape
    assert m % 2 == 0
    packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)) & 0xFF
    return torch.from_numpy(packed.astype(np.uint8).view(np.int8).copy())


def extract_weight_float_cpu(weight, scale_list, source_bit_width):
    """CPU REPRODUCTION C. int8WeightExtractionFloat / int4WeightExtractionFloat: out = float(q) * float(scale[row]);
    for int4 high = (int8)p >> 4 goes to column 2j, low = ((int8)(p << 4)) >> 4 to column 2j+1 (both sign-extended).
    float(q) * float(scale) is exact in float32 (|q| <= 127, the scale is an fp16 value)."""
    import numpy as np
    import torch
    p = weight.detach().cpu().numpy().astype(np.int8)
    if source_bit_width == 8:
        q = p.astype(np.int32)
    elif source_bit_width == 4:
        hi = (p >> 4).astype(np.int32)  # arithmetic shift of a signed byte
        lo = p.astype(np.int32) & 0x0F
        lo = np.where(lo >= 8, lo - 16, lo)
        q = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int32)
        q[:, 0::2], q[:, 1::2] = hi, lo
    else:
        raise ValueError(source_bit_width)
    s = scale_list.detach().cpu().float().numpy().astype(np.float32)
    return torch.from_numpy(q.astype(np.float32) * s[:, None])


def self_test_int4_packing():
    import torch
    q = torch.tensor([[-8, -7, -1, 0, 1, 7, 3, -3]], dtype=torch.int8)
    packed = compress_int4_weight_cpu(q)
    expect = [(-8 << 4 | 9) & 0xFF, (-1 << 4 | 0) & 0xFF, (1 << 4 | 7) & 0xFF, (3 << 4 | 13) & 0xFF]
    got = [int(x) & 0xFF for x in packed[0]]
    check(got == expect, f"int4 packing high nibble = even column ({[hex(x) for x in got]})")
    back = extract_weight_float_cpu(packed, torch.ones(1, dtype=torch.float16), 4)
    check(torch.equal(back, q.float()), "int4 unpack (sign-extended nibbles) inverts the packing")


def quant_diagnostics(w, bits):
    """For one fp16 weight [out, in]: the quantizer's (scale, q) as CUDA computes them (CPU REPRODUCTION A), and how many
    values two tempting shortcuts would get wrong: CPU torch's own fp16 division for the scale, and q from a float32
    quotient w / scale that is not first rounded to fp16."""
    import torch
    amax = w.abs().max(dim=-1).values
    with cuda_arithmetic_on_cpu():
        scale = (amax / ((2 ** (bits - 1)) - 1)).half()
        q = torch.round(w / scale[:, None]).to(torch.int8)
    scale_cpu_native = (amax / ((2 ** (bits - 1)) - 1)).half()
    q_f32 = torch.round(w.float() / scale.float()[:, None]).to(torch.int8)
    return scale, q, {"scales": int(scale.numel()), "scales_differing_with_cpu_fp16_division":
                      int((scale_cpu_native != scale).sum()), "q_values": int(q.numel()),
                      "q_differing_with_unrounded_f32_quotient": int((q_f32 != q).sum())}


def add_counts(acc, d):
    for k, v in d.items():
        acc[k] = acc.get(k, 0) + v
    return acc


# ----------------------------------------------------------------------------------------------------------------------
# Stage: SAT GLM-130B (PYTHONPATH = SAT site dir + stubs)
# ----------------------------------------------------------------------------------------------------------------------

def sat_imports():
    import torch
    torch.cuda.current_device = lambda: torch.device("cpu")  # SAT asks for a CUDA device at construction
    _mf = torch.Tensor.masked_fill_
    torch.Tensor.masked_fill_ = lambda self, m, v: _mf(self, m.bool() if m.dtype != torch.bool else m, v)
    from sat.model.official.glm130B_model import GLM130B
    return GLM130B


@contextlib.contextmanager
def sat_f32_forward():
    """SAT's non-fused softmax path ends with `attention_probs.half()`; for an f32 forward that cast is made a no-op on
    f32 tensors (exactly as shared/golden/make_golden.py does), only while the forward runs."""
    import torch
    orig = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self if self.dtype == torch.float32 else orig(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.half = orig


def sat_args(cfg, seed):
    return argparse.Namespace(num_layers=cfg["num_layers"], vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                              num_attention_heads=cfg["num_attention_heads"],
                              max_sequence_length=cfg["max_sequence_length"], layernorm_order="post",
                              inner_hidden_size=cfg["inner_hidden_size"], model_parallel_size=1, skip_init=False,
                              fp16=False, position_encoding_2d=False, no_glu=False,
                              layernorm_epsilon=cfg["layernorm_epsilon"], use_final_layernorm=True, hidden_dropout=0.0,
                              attention_dropout=0.0, seed=seed)


def stage_sat_build(ctx):
    import torch
    torch.set_num_threads(1)
    GLM130B = sat_imports()
    torch.manual_seed(GLM130B_SEED)
    model = GLM130B(sat_args(GLM130B_CFG, GLM130B_SEED)).float().eval()
    init_(model, GLM130B_SEED, GLM130B_STD)
    model.half()  # the release is fp16
    out = os.path.join(ctx["out"], "sat_tp1")
    os.makedirs(os.path.join(out, ITERATION))
    sd = model.state_dict()
    # SAT's save_checkpoint (mode 'inference'): torch.save({'module': model.state_dict()}, .../<iteration>/mp_rank_00_...)
    torch.save({"module": sd}, os.path.join(out, ITERATION, "mp_rank_00_model_states.pt"))
    with open(os.path.join(out, "latest"), "w") as f:
        f.write(ITERATION)
    log("sat_tp1 keys:")
    for k, dt, sh in tensor_table(sd):
        log(f"  {k} {dt} {sh}")


def sat_glm_mask(B, T, prefix):  # True = blocked (GLM convention), as make_golden.py
    import torch
    m = torch.ones(B, T, T).tril()
    for i, p in enumerate(prefix):
        m[i, :, :p] = 1
    return m.unsqueeze(1) < 0.5


def add_quantized_logits(io_t, model, n, fp16, quant):
    """Stores case `n`'s INT4/INT8 logits and checks they differ from the fp16 ones by a small nonzero
    amount; returns the differences for the manifest."""
    rel = {}
    for bits in (4, 8):
        io_t[f"logits_int{bits}.{n}"] = quant[bits][n]
        d = quant[bits][n] - fp16
        rel[f"int{bits}"] = {"rel_l2": float(d.norm() / fp16.norm()), "max_abs": float(d.abs().max())}
        log(f"{model} case {n}: int{bits} vs fp16 logits: rel L2 {rel[f'int{bits}']['rel_l2']:.4g}, "
            f"max abs {rel[f'int{bits}']['max_abs']:.4g} (logits max abs {float(fp16.abs().max()):.4g})")
        check(0 < rel[f"int{bits}"]["rel_l2"] < (0.25 if bits == 4 else 0.05),
              f"{model} {n}: int{bits} logits differ from fp16 logits by a small nonzero amount")
    return rel


def sat_cases():
    import numpy as np
    c = GLM130B_CFG
    M, G, S = c["mask_id"], c["gmask_id"], c["sop_id"]
    rng = np.random.default_rng(GLM130B_SEED)
    w = lambda n: [int(x) for x in rng.integers(0, M, n)]
    cases = []
    ctx = w(6) + [G]; gen = [S] + w(5); ids = ctx + gen
    cases.append(dict(name="gmask", what="prefix [gMASK] <sop> gen...: 1-D positions keep counting",
                      input_ids=[ids], prefix_len=[len(ctx)], position_ids=[list(range(len(ids)))]))
    left, right = w(3), w(4); ctx = left + [M] + right; span = [S] + w(4); ids = ctx + span
    cases.append(dict(name="mask", what="left [MASK] right <sop> span...: <sop> and the span take the [MASK] position",
                      input_ids=[ids], prefix_len=[len(ctx)],
                      position_ids=[list(range(len(ctx))) + [len(left)] * len(span)]))
    r1 = w(4) + [G] + [S] + w(6); r2 = w(8) + [G] + [S] + w(2)
    cases.append(dict(name="batch", what="two rows of equal length with prefix lengths 5 and 9",
                      input_ids=[r1, r2], prefix_len=[5, 9], position_ids=[list(range(len(r1))), list(range(len(r2)))]))
    return cases


def load_convert_tp(ctx):
    spec = importlib.util.spec_from_file_location("convert_tp", ctx["convert_tp"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stage_sat_logits(ctx):
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    GLM130B = sat_imports()
    convert_tp = load_convert_tp(ctx)
    out = ctx["out"]

    def rank_file(d, r):
        return os.path.join(out, d, ITERATION, f"mp_rank_{r:02d}_model_states.pt")

    def run(sd):
        torch.manual_seed(GLM130B_SEED)
        model = GLM130B(sat_args(GLM130B_CFG, GLM130B_SEED)).float().eval()
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        res = {}
        for c in sat_cases():
            ids = torch.tensor(c["input_ids"]); pos = torch.tensor(c["position_ids"])
            B, T = ids.shape
            with sat_f32_forward():
                res[c["name"]] = model(ids, pos, sat_glm_mask(B, T, c["prefix_len"]))[0]
            assert res[c["name"]].dtype == torch.float32
        return res

    tp1 = torch.load(rank_file("sat_tp1", 0), map_location="cpu")["module"]
    logits = run(tp1)

    quant = {}
    manifest_q = {}
    tp2 = [torch.load(rank_file("sat_tp2", r), map_location="cpu")["module"] for r in range(2)]
    for bits in (4, 8):
        d = f"sat_int{bits}_tp2"
        ranks = [torch.load(rank_file(d, r), map_location="cpu")["module"] for r in range(2)]
        # the quantized ranks hold exactly quantize(rank-local fp16 slice): the same slices as sat_tp2 (row-parallel
        # scales are per rank-local slice), every other tensor equal to sat_tp2's
        counts = {}
        for r in range(2):
            for k, v in ranks[r].items():
                if k.endswith("_scale"):
                    continue
                if k + "_scale" in ranks[r]:
                    scale, q, c = quant_diagnostics(tp2[r][k], bits)
                    add_counts(counts, c)
                    if bits == 4:
                        q = compress_int4_weight_cpu(q)
                    if not (torch.equal(q, v) and torch.equal(scale.view(torch.int16),
                                                              ranks[r][k + "_scale"].view(torch.int16))):
                        fail(f"{d} rank {r} {k}: stored int/scale differ from quantize(sat_tp2 slice)")
                elif not (v.dtype == tp2[r][k].dtype and torch.equal(v, tp2[r][k])):
                    fail(f"{d} rank {r} {k} differs from sat_tp2")
        check(True, f"{d}: each rank = quantize(the sat_tp2 rank-local fp16 slice); other tensors = sat_tp2's")
        log(f"{d}: {counts}")
        deq = []
        for sd in ranks:
            x = {}
            for k, v in sd.items():
                if k.endswith("_scale"):
                    continue
                if k + "_scale" in sd:
                    x[k] = extract_weight_float_cpu(v, sd[k + "_scale"], bits)
                else:
                    x[k] = v
            deq.append(x)
        # merge the dequantized ranks back to TP=1 with convert_tp.py's own rules (create_checkpoint/merge_weights)
        merged = convert_tp.create_checkpoint(deq, 0, 2, 1, None)["module"]
        errs = {}
        for k, v in merged.items():
            if k.endswith(".weight") and v.dtype == torch.float32:
                ref = tp1[k].float()
                errs[k] = float((v - ref).abs().max() / ref.abs().max())
        worst = max(errs.values())
        log(f"int{bits} dequantized weights: worst max|w_q - w| / max|w| over the block linears = {worst:.4g}")
        check(worst < (0.1 if bits == 4 else 0.01), f"sat int{bits} dequantized weights close to the fp16 ones")
        quant[bits] = run(merged)
        manifest_q[f"int{bits}"] = {"worst_rel_weight_error": worst, "quantizer_arithmetic": counts}

    io_t = {}
    summary = []
    for c in sat_cases():
        n = c["name"]
        io_t[f"input_ids.{n}"] = torch.tensor(c["input_ids"])
        io_t[f"position_ids.{n}"] = torch.tensor(c["position_ids"])
        io_t[f"prefix_len.{n}"] = torch.tensor(c["prefix_len"])
        io_t[f"logits.{n}"] = logits[n]
        rel = add_quantized_logits(io_t, "sat", n, logits[n], quant)
        summary.append({k: c[k] for k in ("name", "what", "input_ids", "position_ids", "prefix_len")} |
                       {"logits_shape": list(logits[n].shape), "quantized_vs_fp16": rel})
    save_safetensors(os.path.join(out, "sat.io.safetensors"), io_t)
    json.dump({"cases": summary, "dequantized": manifest_q}, open(os.path.join(ctx["tmp"], "sat_part.json"), "w"))


# ----------------------------------------------------------------------------------------------------------------------
# Stage: convert_tp.py with quantization (plain python3 + CPU reproductions of its GPU pieces)
# ----------------------------------------------------------------------------------------------------------------------

def stage_convert_tp_quant(ctx, argv):
    """Runs the official tools/convert_tp.py file unmodified (runpy, as __main__) after: a CPU `kernels` module with
    compress_int4_weight (CPU REPRODUCTION B) in sys.modules (the official kernels/ loads a CUDA fatbin through
    cpm_kernels) and the CUDA arithmetic of cuda_arithmetic_on_cpu() (CPU REPRODUCTION A)."""
    import torch
    torch.set_num_threads(1)
    kernels = types.ModuleType("kernels")
    kernels.compress_int4_weight = compress_int4_weight_cpu
    sys.modules["kernels"] = kernels
    os.chdir(os.path.dirname(os.path.dirname(ctx["convert_tp"])))
    sys.argv = [ctx["convert_tp"]] + argv
    with cuda_arithmetic_on_cpu():
        runpy.run_path(ctx["convert_tp"], run_name="__main__")


# ----------------------------------------------------------------------------------------------------------------------
# Stage: ChatGLM-6B (PYTHONPATH = transformers 4.27.1 site dir + exported official package)
# ----------------------------------------------------------------------------------------------------------------------

def chatglm_cases():
    import numpy as np
    c = CHATGLM_CFG
    M, G, S = c["mask_token_id"], c["gmask_token_id"], c["bos_token_id"]
    rng = np.random.default_rng(CHATGLM_SEED)
    w = lambda n: [int(x) for x in rng.integers(0, M, n)]
    return [
        dict(name="gmask", what="text [gMASK] <sop> gen...", input_ids=[w(5) + [G, S] + w(4)]),
        dict(name="mask", what="left [MASK] right [gMASK] <sop> span... (v1.1 always appends [gMASK] <sop>; the "
                               "official code then uses the [gMASK] position, not the [MASK] one)",
             input_ids=[w(3) + [M] + w(4) + [G, S] + w(3)]),
        dict(name="batch", what="two rows of equal length: text [gMASK] <sop> gen / left [MASK] right [gMASK] <sop> "
                                "span, context lengths 5 and 7",
             input_ids=[w(4) + [G, S] + w(6), w(2) + [M] + w(3) + [G, S] + w(4)]),
    ]


def stage_chatglm(ctx):
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import transformers
    from chatglm_6b.configuration_chatglm import ChatGLMConfig
    from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
    import chatglm_6b.quantization as Q
    check(Q.kernels is None, "official quantization.py found no cpm_kernels (CPU run; its GPU kernels are reproduced)")
    # CPU REPRODUCTION B / C plugged into the official module: its QuantizedLinear / W8A16Linear call these globals.
    Q.compress_int4_weight = compress_int4_weight_cpu
    Q.extract_weight_to_half = extract_weight_float_cpu  # f32 logits from q.float() * scale.float()
    # from_pretrained of a quantized checkpoint builds QuantizedLinear(weight_tensor=w.to(torch.cuda.current_device()),
    # empty_init=True): stay on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    out = ctx["out"]

    config = ChatGLMConfig(**CHATGLM_CFG)
    config.auto_map = dict(CHATGLM_AUTO_MAP)
    torch.manual_seed(CHATGLM_SEED)
    model = ChatGLMForConditionalGeneration(config, empty_init=False)
    model.float()
    init_(model, CHATGLM_SEED, CHATGLM_STD)
    model.half().eval()  # the release is fp16
    check(not torch.equal(model.lm_head.weight, model.transformer.word_embeddings.weight),
          "chatglm lm_head differs from the input embedding")
    for k, dt, sh in tensor_table(model.state_dict()):
        log(f"  {k} {dt} {sh}")
    # The official GLMBlock defaults num_layers=28 and ChatGLMModel.get_layer does not pass config.num_layers, so the
    # DeepNorm residual alpha = sqrt(2 * 28) whatever config.num_layers says. Recorded, not changed.
    block_layers = sorted({blk.num_layers for blk in model.transformer.layers})
    log(f"official GLMBlock.num_layers = {block_layers} (config.num_layers = {config.num_layers})")
    check(block_layers == [28], "chatglm: the official blocks use alpha = sqrt(2*28) (GLMBlock default), recorded")

    cases = chatglm_cases()
    prepared = {}
    for c in cases:
        ids = torch.tensor(c["input_ids"])
        # what forward() and generate() compute from input_ids (prepare_inputs_for_generation calls the official
        # get_masks / get_position_ids with the mask positions forward() uses)
        p = model.prepare_inputs_for_generation(ids)
        ctx_len = [row.index(CHATGLM_CFG["bos_token_id"]) for row in c["input_ids"]]
        B, T = ids.shape
        m = torch.ones(B, T, T).tril()
        for i, cl in enumerate(ctx_len):
            m[i, :, :cl] = 1
        check(torch.equal(p["attention_mask"], (m.unsqueeze(1) < 0.5)),
              f"chatglm {c['name']}: official get_masks = bidirectional before <sop>, causal after")
        prepared[c["name"]] = (ids, p["position_ids"], p["attention_mask"], ctx_len)

    def logits_of(m):
        m32 = m.float().eval()
        res = {}
        for c in cases:
            ids, pos, mask, _ = prepared[c["name"]]
            own = m32(input_ids=ids).logits  # forward computes its own position ids and mask
            given = m32(input_ids=ids, position_ids=pos, attention_mask=mask).logits
            if not torch.equal(own, given):
                fail(f"chatglm {c['name']}: forward's own positions/mask differ from prepare_inputs_for_generation's")
            assert own.dtype == torch.float32
            res[c["name"]] = own
        return res

    logits = logits_of(copy.deepcopy(model))

    # --- hf_bin / hf_safetensors: official save_pretrained, sharded ---
    for d, safe in (("hf_bin", False), ("hf_safetensors", True)):
        path = os.path.join(out, d)
        model.save_pretrained(path, max_shard_size=HF_MAX_SHARD_SIZE, safe_serialization=safe)
        idx = json.load(open(os.path.join(path, "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")))
        nshards = len(set(idx["weight_map"].values()))
        check(3 <= nshards <= 4, f"{d}: {nshards} shards + index")
        # the shards hold exactly the model's state dict, bit for bit
        sd = {}
        for shard in sorted(set(idx["weight_map"].values())):
            if safe:
                from safetensors.torch import load_file
                part = load_file(os.path.join(path, shard))
            else:
                part = torch.load(os.path.join(path, shard), map_location="cpu")
            for k in part:
                if idx["weight_map"][k] != shard:
                    fail(f"{d}: {k} in {shard} but the index says {idx['weight_map'][k]}")
            sd.update(part)
        ref = model.state_dict()
        check(set(sd) == set(ref) and all(sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]) for k in ref),
              f"{d}: the shards' tensors equal the model's state dict bit for bit")
        # official from_pretrained loading gives the same logits as before saving
        re = ChatGLMForConditionalGeneration.from_pretrained(path)
        lg = logits_of(re)
        check(all(torch.equal(lg[k], logits[k]) for k in logits), f"{d}: from_pretrained reload gives identical logits")

    # finding: with the release's config (no tie_word_embeddings, so True by default) transformers re-ties lm_head to the
    # input embedding after loading. The release's two tensors are equal, so it does not matter there.
    tied = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(out, "hf_bin"), tie_word_embeddings=True)
    ties = bool(tied.lm_head.weight.data_ptr() == tied.transformer.word_embeddings.weight.data_ptr())
    log(f"from_pretrained with tie_word_embeddings=True ties lm_head to word_embeddings: {ties}")

    # --- hf_int4 / hf_int8: official quantize (fp16 model, as `.half().quantize(b)`), save_pretrained ---
    quant, qinfo = {}, {}
    for bits in (4, 8):
        mq = copy.deepcopy(model)
        counts, expect = {}, {}
        for i, layer in enumerate(mq.transformer.layers):
            for name, lin in (("attention.query_key_value", layer.attention.query_key_value),
                              ("attention.dense", layer.attention.dense), ("mlp.dense_h_to_4h", layer.mlp.dense_h_to_4h),
                              ("mlp.dense_4h_to_h", layer.mlp.dense_4h_to_h)):
                scale, q, c = quant_diagnostics(lin.weight.detach(), bits)
                add_counts(counts, c)
                expect[f"transformer.layers.{i}.{name}"] = (compress_int4_weight_cpu(q) if bits == 4 else q, scale)
        with cuda_arithmetic_on_cpu():
            mq.quantize(bits)  # official ChatGLMForConditionalGeneration.quantize -> quantization.quantize
        sdq = mq.state_dict()
        check(all(torch.equal(sdq[k + ".weight"], q) and torch.equal(sdq[k + ".weight_scale"].view(torch.int16),
                                                                       s.view(torch.int16)) for k, (q, s) in expect.items()),
              f"chatglm int{bits}: the official quantize() gave the weights/scales of quant_diagnostics()")
        check(mq.config.quantization_bit == bits, f"chatglm int{bits}: config.quantization_bit set by quantize()")
        path = os.path.join(out, f"hf_int{bits}")
        mq.save_pretrained(path)
        in_mem = logits_of(copy.deepcopy(mq))
        re = ChatGLMForConditionalGeneration.from_pretrained(path)
        lg = logits_of(re)
        check(all(torch.equal(lg[k], in_mem[k]) for k in lg),
              f"hf_int{bits}: from_pretrained (quantization_bit in config) reload gives identical logits")
        quant[bits] = lg
        qinfo[f"int{bits}"] = {"quantizer_arithmetic": counts}
        log(f"chatglm int{bits}: {counts}")

    io_t, summary = {}, []
    for c in cases:
        n = c["name"]
        ids, pos, mask, ctx_len = prepared[n]
        io_t[f"input_ids.{n}"] = ids
        io_t[f"position_ids.{n}"] = pos
        io_t[f"prefix_len.{n}"] = torch.tensor(ctx_len)
        io_t[f"logits.{n}"] = logits[n]
        rel = add_quantized_logits(io_t, "chatglm", n, logits[n], quant)
        summary.append({"name": n, "what": c["what"], "input_ids": c["input_ids"], "position_ids": pos.tolist(),
                        "prefix_len": ctx_len, "logits_shape": list(logits[n].shape), "quantized_vs_fp16": rel})
    save_safetensors(os.path.join(out, "chatglm.io.safetensors"), io_t)

    def dir_table(d):
        path = os.path.join(out, d)
        files = sorted(os.listdir(path))
        res = {"files": files, "tensors": {}, "bin_pickles": {}}
        for f in files:
            fp = os.path.join(path, f)
            if f.endswith(".bin"):
                sd = torch.load(fp, map_location="cpu")
                res["bin_pickles"][f] = {"type": type(sd).__module__ + "." + type(sd).__name__,
                                         "zip_entries": zip_entries(fp)}
            elif f.endswith(".safetensors"):
                from safetensors.torch import load_file
                sd = load_file(fp)
            else:
                continue
            res["tensors"][f] = tensor_table(sd)
        return res

    part = {
        "config": json.load(open(os.path.join(out, "hf_bin", "config.json"))),
        "init": {"seed": CHATGLM_SEED, "std": CHATGLM_STD},
        "max_shard_size_bytes": HF_MAX_SHARD_SIZE,
        "checkpoints": {d: dir_table(d) for d in ("hf_bin", "hf_safetensors", "hf_int4", "hf_int8")},
        "cases": summary,
        "quantization": qinfo,
        "deepnorm_alpha": {"value": (2 * 28) ** 0.5, "GLMBlock.num_layers": block_layers,
                           "note": "modeling_chatglm.py GLMBlock(num_layers=28 default) is built without "
                                   "config.num_layers, so alpha = sqrt(2*28) = 7.4833 for any num_layers; the tiny "
                                   "model's logits use this alpha, not sqrt(2*2)"},
        "from_pretrained_reties_lm_head_when_tie_word_embeddings_true": ties,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    import safetensors, huggingface_hub, tokenizers
    part["versions"].update(safetensors=safetensors.__version__, huggingface_hub=huggingface_hub.__version__,
                            tokenizers=tokenizers.__version__)
    json.dump(part, open(os.path.join(ctx["tmp"], "chatglm_part.json"), "w"))


# ----------------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------------

SAT_STUBS = {
    # SAT imports triton (position_embedding/triton_rotary.py) and transformers (gpt2_model, tokenizers) at import time;
    # the model code used here never calls them.
    "triton/__init__.py": "def jit(fn=None, **k): return fn or (lambda f: f)\n"
                          "def heuristics(*a, **k): return lambda f: f\n"
                          "def autotune(*a, **k): return lambda f: f\n"
                          "class Config:\n    def __init__(self, *a, **k): pass\n"
                          "from . import language\n",
    "triton/language.py": "constexpr = int\n",
    "transformers/__init__.py": "class AutoTokenizer: pass\nclass T5Tokenizer: pass\n",
    "transformers/activations.py": "import collections, torch\n"
                                   "ACT2FN = collections.defaultdict(lambda: torch.nn.functional.gelu)\n",
}


def run_stage(ctx, stage, pythonpath, extra=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    env["HF_MODULES_CACHE"] = os.path.join(ctx["tmp"], "hf_modules")
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--ctx", os.path.join(ctx["tmp"], "ctx.json")]
    cmd += list(extra)
    log(f"\n=== stage {stage}: {' '.join(cmd[3:])}")
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        fail(f"stage {stage} exited with {r.returncode}")


def run_convert_tp(ctx, argv):
    """The official tools/convert_tp.py, unmodified, as its README runs it (plain python3, from the repo root)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "tools/convert_tp.py"] + argv
    log(f"\n=== official convert_tp.py: {' '.join(cmd[1:])}")
    r = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(ctx["convert_tp"])))
    if r.returncode != 0:
        fail(f"convert_tp.py {argv} exited with {r.returncode}")


def sat_dir_table(path):
    import torch
    latest = open(os.path.join(path, "latest")).read()
    ranks = sorted(f for f in os.listdir(os.path.join(path, latest)))
    res = {"latest": latest, "ranks": []}
    for f in ranks:
        obj = torch.load(os.path.join(path, latest, f), map_location="cpu")
        fp = os.path.join(path, latest, f)
        res["ranks"].append({"file": f"{latest}/{f}", "top_level_keys": list(obj.keys()),
                             "module_type": type(obj["module"]).__module__ + "." + type(obj["module"]).__name__,
                             "zip_entries": zip_entries(fp) if f.startswith("mp_rank_00") else None,
                             "tensors": tensor_table(obj["module"])})
    return res


def compare_sat_tp1(ref_dir, other_dir, what):
    import torch
    a = torch.load(os.path.join(ref_dir, ITERATION, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
    b = torch.load(os.path.join(other_dir, ITERATION, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
    same = list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                      torch.equal(a[k].view(torch.int16) if a[k].dtype == torch.float16 else a[k],
                                                  b[k].view(torch.int16) if b[k].dtype == torch.float16 else b[k])
                                      for k in a)
    check(same, f"{what} merged back to TP=1 by convert_tp.py is bit-identical to sat_tp1 (keys, order, dtypes, bits)")
    fa = os.path.join(ref_dir, ITERATION, "mp_rank_00_model_states.pt")
    fb = os.path.join(other_dir, ITERATION, "mp_rank_00_model_states.pt")
    return open(fa, "rb").read() == open(fb, "rb").read()


def export_official(ctx, args):
    tmp = ctx["tmp"]
    # GLM-130B: only tools/convert_tp.py is run; the files its GPU steps come from are hashed for the record
    g = os.path.join(tmp, "glm130b")
    os.makedirs(g)
    tar = git(args.glm130b_repo, "archive", "--format=tar", args.glm130b_commit, "tools/convert_tp.py")
    subprocess.run(["tar", "-x", "-C", g], input=tar, check=True)
    ctx["convert_tp"] = os.path.join(g, "tools", "convert_tp.py")
    glm_full = git(args.glm130b_repo, "rev-parse", args.glm130b_commit).decode().strip()
    glm_files = {f: git(args.glm130b_repo, "rev-parse", f"{args.glm130b_commit}:{f}").decode().strip()
                 for f in ("tools/convert_tp.py", "kernels/__init__.py", "cuda/quantization.cu",
                           "quantization/layers.py", "quantization/functional.py")}
    # ChatGLM-6B HF repo code, as an importable package (modeling_chatglm.py imports .configuration_chatglm)
    p = os.path.join(tmp, "pkg", "chatglm_6b")
    os.makedirs(p)
    open(os.path.join(p, "__init__.py"), "w").close()
    chat_full = git(args.chatglm_repo, "rev-parse", args.chatglm_commit).decode().strip()
    chat_files = {}
    for f in ("modeling_chatglm.py", "configuration_chatglm.py", "quantization.py"):
        open(os.path.join(p, f), "wb").write(git(args.chatglm_repo, "show", f"{args.chatglm_commit}:{f}"))
        chat_files[f] = git(args.chatglm_repo, "rev-parse", f"{args.chatglm_commit}:{f}").decode().strip()
    # SAT stubs
    for rel, text in SAT_STUBS.items():
        fp = os.path.join(tmp, "stubs", rel)
        os.makedirs(os.path.dirname(fp), exist_ok=True)
        open(fp, "w").write(text)
    old_full = git(args.chatglm_repo, "rev-parse", CHATGLM_OLD_CONFIG_COMMIT).decode().strip()
    return {"glm130b": {"repo": "github.com/THUDM/GLM-130B", "commit": glm_full, "git_blobs": glm_files},
            "chatglm6b": {"repo": "huggingface.co/THUDM/chatglm-6b", "commit": chat_full, "git_blobs": chat_files,
                          "old_config_commit": old_full}}


def copy_configs(args, out):
    d = os.path.join(out, "configs")
    os.makedirs(d)
    res = {}
    for commit, tag in ((args.chatglm_commit, "v1.1"), (CHATGLM_OLD_CONFIG_COMMIT, "pre-2023-04")):
        for f in ("config.json", "tokenizer_config.json"):
            name = f"chatglm-6b-{tag}.{f}"
            open(os.path.join(d, name), "wb").write(git(args.chatglm_repo, "show", f"{commit}:{f}"))
            res[name] = {"commit": git(args.chatglm_repo, "rev-parse", commit).decode().strip(), "path": f}
    return res


def generate(args, out):
    import torch
    import numpy
    for name in GENERATED:
        fp = os.path.join(out, name)
        if os.path.isdir(fp):
            shutil.rmtree(fp)
        elif os.path.exists(fp):
            os.remove(fp)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="glm-import-fixtures-")
    ctx = {"out": os.path.abspath(out), "tmp": tmp}
    try:
        sources = export_official(ctx, args)
        json.dump(ctx, open(os.path.join(tmp, "ctx.json"), "w"))
        self_test_int4_packing()
        sat_path = [args.sat_site, os.path.join(tmp, "stubs")]
        run_stage(ctx, "sat-build", sat_path)
        for n in (2, 4):
            run_convert_tp(ctx, ["--input-folder", os.path.join(out, "sat_tp1"), "--output-folder",
                                 os.path.join(out, f"sat_tp{n}"), "--target-tp", str(n)])
        pt_identical = {}
        for n in (2, 4):
            rt = os.path.join(tmp, f"roundtrip_tp{n}_to_tp1")
            run_convert_tp(ctx, ["--input-folder", os.path.join(out, f"sat_tp{n}"), "--output-folder", rt,
                                 "--target-tp", "1"])
            pt_identical[f"sat_tp{n}->tp1"] = compare_sat_tp1(os.path.join(out, "sat_tp1"), rt, f"sat_tp{n}")
            log(f"  (the roundtrip .pt file is {'byte-identical' if pt_identical[f'sat_tp{n}->tp1'] else 'NOT byte-identical'}"
                f" to sat_tp1's)")
        for bits in (4, 8):
            run_stage(ctx, "convert-tp-quant", [], ["--", "--input-folder", os.path.join(out, "sat_tp1"),
                                                    "--output-folder", os.path.join(out, f"sat_int{bits}_tp2"),
                                                    "--target-tp", "2", "--quantization-bit-width", str(bits)])
        run_stage(ctx, "sat-logits", sat_path)
        run_stage(ctx, "chatglm", [args.hf_site, os.path.join(tmp, "pkg")])
        configs = copy_configs(args, out)

        sat_part = json.load(open(os.path.join(tmp, "sat_part.json")))
        chat_part = json.load(open(os.path.join(tmp, "chatglm_part.json")))
        sat_tables = {d: sat_dir_table(os.path.join(out, d))
                      for d in ("sat_tp1", "sat_tp2", "sat_tp4", "sat_int4_tp2", "sat_int8_tp2")}
        sat_site_ver = [f for f in os.listdir(args.sat_site) if f.lower().startswith("swissarmytransformer-")]
        manifest = {
            "generator": "scripts/make_import_fixtures.py (see fixtures/import/README.md); never edit these files to "
                         "make a test pass",
            "official_sources": {
                "swissarmytransformer": {"pypi": "SwissArmyTransformer==0.4.12", "dist_info": sat_site_ver,
                                         "used": "sat/model/official/glm130B_model.py GLM130B; SAT's inference "
                                                 "save format torch.save({'module': state_dict})"},
                **sources,
                "transformers": chat_part["versions"]["transformers"],
                "safetensors": chat_part["versions"]["safetensors"],
                "huggingface_hub": chat_part["versions"]["huggingface_hub"],
                "tokenizers": chat_part["versions"]["tokenizers"],
                "torch": torch.__version__ + " (Debian python3-torch 1.13.1+dfsg, CPU)",
                "numpy": numpy.__version__,
                "python": sys.version.split()[0],
            },
            "glm130b": {
                "model": "SAT GLM130B (sat.model.official.glm130B_model), fp16 checkpoint",
                "config": GLM130B_CFG | {"dense_h_to_4h_rows": 2 * GLM130B_CFG["inner_hidden_size"],
                                         "deepnorm_alpha": (2 * GLM130B_CFG["num_layers"]) ** 0.5},
                "init": {"seed": GLM130B_SEED, "std": GLM130B_STD,
                         "rule": "LayerNorm weights 1 + std*N(0,1); every other parameter (biases too) std*N(0,1); "
                                 "float32 init, then .half()"},
                "checkpoints": sat_tables,
                "roundtrip_pt_file_byte_identical_to_sat_tp1": pt_identical,
                "io": "sat.io.safetensors",
                "io_keys": "input_ids.<case> [B,T] I64, position_ids.<case> [B,T] I64, prefix_len.<case> [B] I64, "
                           "logits.<case> / logits_int4.<case> / logits_int8.<case> [B,T,V] F32",
                "cases": sat_part["cases"],
                "dequantized_weights": sat_part["dequantized"],
                "logits_notes": [
                    "official SAT GLM130B forward in float32 on CPU; fp16 weights of sat_tp1 upcast with .float()",
                    "mask: bool [B,1,T,T], True = blocked: columns < prefix_len visible to every row, causal after",
                    "SAT's non-fused softmax path casts the probabilities with .half(); for these f32 logits that cast "
                    "is a no-op (as in fixtures/golden)",
                    "logits_int4/int8: each rank of sat_int{4,8}_tp2 dequantized with q.float() * scale.float() "
                    "(GLM-130B's *WeightExtractionFloat), ranks merged to TP=1 by convert_tp.py's create_checkpoint/"
                    "merge_weights, same f32 forward. (The fp16 runtime's *WeightExtractionHalf would round q*scale to "
                    "fp16; these logits do not.)",
                ],
            },
            "chatglm6b": chat_part | {"io": "chatglm.io.safetensors",
                                       "io_keys": "input_ids.<case> [B,T] I64, position_ids.<case> [B,2,T] I64 "
                                                  "(position, block position; computed by the official model), "
                                                  "prefix_len.<case> [B] I64 (context length = index of <sop>), "
                                                  "logits.<case> / logits_int4.<case> / logits_int8.<case> [B,T,V] F32",
                                       "logits_notes": [
                                           "official ChatGLMForConditionalGeneration (HF repo 8b7d335) forward on "
                                           "CPU after .float(): fp16 weights upcast; lm_logits are float32",
                                           "the official RotaryEmbedding stores inv_freq as fp16 (inv_freq.half() in "
                                           "__init__); .float() keeps those fp16-rounded values, so the f32 logits "
                                           "use 1/10000^(2i/d) rounded to fp16, and positions t in float32",
                                           "logits_int4/int8: from_pretrained(hf_int{4,8}) (config quantization_bit), "
                                           ".float(), W8A16Linear with the weight dequantized as q.float() * "
                                           "scale.float() (CPU REPRODUCTION C)",
                                       ]},
            "configs": configs,
            "cpu_reproductions": [
                {"what": "fp16 quantization arithmetic of convert_tp.py merge_weights and ChatGLM quantization.py "
                         "QuantizedLinear (they call .cuda() / .to(torch.cuda.current_device()))",
                 "how": "Tensor.cuda() identity; scale = half(float(absmax) * (1.0f / float(2^(b-1)-1))) as CUDA's "
                        "div_true_kernel does for a CPU-scalar divisor; w / scale as half(float(w) / float(scale)); "
                        "torch.round(half) as half(nearbyint(float)), round half to even; abs/max exact in fp16",
                 "why": "no GPU; CPU torch 1.13 has no round for Half, and its fp16 division by a scalar divides "
                        "instead of multiplying by the reciprocal",
                 "where": "make_import_fixtures.py: cuda_arithmetic_on_cpu()"},
                {"what": "int4 packing (GLM-130B kernels.compress_int4_weight = cuda/quantization.cu "
                         "int4WeightCompression; same kernel in ChatGLM quantization.py)",
                 "how": "out[r,j] = (q[r,2j] << 4) | (q[r,2j+1] & 0x0F) as int8",
                 "why": "the official kernels are CUDA fatbins loaded through cpm_kernels",
                 "where": "make_import_fixtures.py: compress_int4_weight_cpu(); given to convert_tp.py as a CPU "
                          "`kernels` module in sys.modules and set as chatglm_6b.quantization.compress_int4_weight"},
                {"what": "dequantization for the f32 logits (int4/int8WeightExtractionFloat)",
                 "how": "q.float() * scale.float()[:, None]; int4: high nibble -> column 2j, low nibble -> 2j+1, "
                        "both sign-extended",
                 "why": "CUDA-only kernels",
                 "where": "make_import_fixtures.py: extract_weight_float_cpu(); for ChatGLM set as "
                          "chatglm_6b.quantization.extract_weight_to_half so the official W8A16Linear uses it"},
            ],
            "findings": [
                "ChatGLM-6B HF code (8b7d335): the DeepNorm alpha is sqrt(2*28) for ANY num_layers (GLMBlock's default "
                "num_layers=28 is never overridden), so the 2-layer ChatGLM logits here use alpha = 7.4833; SAT's "
                "GLM130B uses sqrt(2*num_layers) = 2 here. For the real 28-layer model both agree.",
                "SAT GLM-130B rank files hold `module` as the collections.OrderedDict of state_dict() (with its "
                "_metadata attribute) when saved by SAT, but as a plain dict when written by convert_tp.py; HF .bin "
                "shards hold plain dicts. Same tensors, different pickles.",
                "SAT 0.4.12 keeps RoPE's inv_freq as one buffer `mixins.rotary-embedding.rotary_emb.inv_freq` (fp16 "
                "after .half()); convert_tp.py only knows `attention.rotary_emb.inv_freq`, so it splits/concatenates "
                "this key along dim 0 like a vocab-parallel tensor (per rank 8/TP elements). SAT's RotaryEmbedding "
                "ignores it on load: importers must ignore it and recompute inv_freq.",
                "SAT's GLM130B state dict lists mlp.dense_4h_to_h before mlp.dense_h_to_4h (the GeGLU mixin re-creates "
                "dense_h_to_4h); convert_tp keeps that order and writes each `<key>_scale` right after its weight.",
                "ChatGLM-6B v1.1 keeps per-layer `transformer.layers.N.attention.rotary_emb.inv_freq` fp16 buffers in "
                "the checkpoint (ignored on load: RotaryEmbedding._load_from_state_dict is a no-op).",
                "The release config.json has no tie_word_embeddings (so True): transformers' from_pretrained then makes "
                "lm_head the input embedding after loading (checked here: "
                f"{chat_part['from_pretrained_reties_lm_head_when_tie_word_embeddings_true']}). The release's two "
                "tensors are equal, so nothing changes there; these fixtures use a different lm_head and "
                "tie_word_embeddings=false so that the official loader keeps it.",
                "ChatGLM-6B v1.1 with both [MASK] and [gMASK] in a row: forward uses the [gMASK] position for the "
                "generated part (gMASK if present, else MASK), not the [MASK] position.",
            ],
            "checks": [
                "sat_tp2 and sat_tp4 merged back to TP=1 by the official convert_tp.py are bit-identical to sat_tp1",
                "int4 packing/unpacking self test",
                "sat: dequantized int4/int8 weights close to the fp16 ones; quantized logits differ a little",
                "chatglm: official get_masks = prefix rule; forward's own positions/mask = prepare_inputs_for_generation's",
                "chatglm: hf_bin / hf_safetensors shards equal the state dict bit for bit; from_pretrained reload "
                "gives bit-identical logits; hf_int4/int8 from_pretrained reload = in-memory quantized model",
            ],
        }
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def list_files(root):
    res = []
    for d, _, fs in os.walk(root):
        for f in fs:
            res.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures", "import"))
    ap.add_argument("--sat-site", default=os.path.join(ENV_DIR, "satenv"),
                    help="pip --target folder with SwissArmyTransformer==0.4.12 (+ einops tqdm filelock packaging regex)")
    ap.add_argument("--hf-site", default=os.path.join(ENV_DIR, "hfenv"),
                    help="pip --target folder with transformers==4.27.1 and its light dependencies")
    ap.add_argument("--glm130b-repo", default="/work/.mirror/THUDM+GLM-130B/repo")
    ap.add_argument("--glm130b-commit", default=GLM130B_COMMIT)
    ap.add_argument("--chatglm-repo", default="/work/.mirror/greensheng+chatglm-6b/repo")
    ap.add_argument("--chatglm-commit", default=CHATGLM_COMMIT)
    ap.add_argument("--verify-determinism", action="store_true",
                    help="after writing --out, build everything again in a temporary folder and compare bytes")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()

    if args.stage:
        ctx = json.load(open(args.ctx))
        if rest and rest[0] == "--":
            rest = rest[1:]
        {"sat-build": lambda: stage_sat_build(ctx), "sat-logits": lambda: stage_sat_logits(ctx),
         "convert-tp-quant": lambda: stage_convert_tp_quant(ctx, rest),
         "chatglm": lambda: stage_chatglm(ctx)}[args.stage]()
        return
    if rest:
        ap.error(f"unknown arguments {rest}")
    args.out = os.path.abspath(args.out)
    for p in (args.sat_site, args.hf_site):
        if not os.path.isdir(p):
            fail(f"{p} missing: see the setup commands at the top of this script")

    generate(args, args.out)
    log("\nfiles:")
    total = 0
    for f in list_files(args.out):
        sz = os.path.getsize(os.path.join(args.out, f))
        total += sz
        log(f"  {sz:9d}  {f}")
    log(f"  {total:9d}  total")
    check(total < 3_000_000, "fixtures/import under 3 MB")

    if args.verify_determinism:
        again = tempfile.mkdtemp(prefix="glm-import-fixtures-again-")
        try:
            generate(args, again)
            a, b = list_files(args.out), [f for f in list_files(again)]
            a = [f for f in a if f != "README.md"]
            check(a == b, "second run wrote the same file list")
            differ = [f for f in a if open(os.path.join(args.out, f), "rb").read() !=
                      open(os.path.join(again, f), "rb").read()]
            for f in a:
                log(f"  {'DIFFERENT' if f in differ else 'identical'}  {f}")
            check(not [f for f in differ if f.endswith(".safetensors")], "all .safetensors byte-identical across runs")
            check(not differ, "every file byte-identical across runs (.pt/.bin zips included)")
        finally:
            shutil.rmtree(again, ignore_errors=True)


if __name__ == "__main__":
    main()
