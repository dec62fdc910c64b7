#!/usr/bin/env python3
"""Logits of a SAT checkpoint folder computed by GLM-130B's own code: SwissArmyTransformer's
`GLM130B` built from the folder's `model_config.json`, loaded with SAT's `load_checkpoint` (what
GLM-130B's initialize.py calls: it reads `latest`, picks the rank file, refuses missing keys in
inference mode), run in float32 on the inputs of an IO file. Proves that a folder `glm convert --to
sat` wrote is served by the official code exactly as glm serves it.

    PYTHONPATH=<SAT 0.4.12 site dir> /usr/bin/python3 scripts/sat_logits.py SAT_DIR IO.safetensors OUT.safetensors

IO.safetensors holds `input_ids.<case>`, `position_ids.<case>`, `prefix_len.<case>` (I64), as
fixtures/import/sat.io.safetensors does; OUT gets `logits.<case>` (F32). The stubs and patches
are make_import_fixtures.py's (SAT imports triton/transformers it never uses; CUDA calls to CPU).
"""
import argparse, json, os, struct, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_import_fixtures as mif  # noqa: E402


def read_safetensors(path):
    import numpy as np
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        dt = {"I64": np.int64, "F32": np.float32}[v["dtype"]]
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(b[8 + n + s:8 + n + e], dtype=dt).reshape(v["shape"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sat_dir")
    ap.add_argument("io")
    ap.add_argument("out")
    a = ap.parse_args()
    stubs = tempfile.mkdtemp()
    for rel, text in mif.SAT_STUBS.items():
        fp = os.path.join(stubs, rel)
        os.makedirs(os.path.dirname(fp), exist_ok=True)
        open(fp, "w").write(text)
    sys.path.append(stubs)
    import torch
    torch.set_num_threads(1)
    GLM130B = mif.sat_imports()
    from sat import mpu
    from sat.training.model_io import load_checkpoint
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % (29500 + os.getpid() % 1000),
                                             world_size=1, rank=0)
    mpu.initialize_model_parallel(1)
    cfg = json.load(open(os.path.join(a.sat_dir, "model_config.json")))
    args = argparse.Namespace(num_layers=cfg["num_layers"], vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                              num_attention_heads=cfg["num_attention_heads"],
                              max_sequence_length=cfg["max_sequence_length"], layernorm_order="post",
                              inner_hidden_size=cfg["inner_hidden_size"], model_parallel_size=1, skip_init=True,
                              fp16=False, position_encoding_2d=False, no_glu=False,
                              layernorm_epsilon=cfg["layernorm_epsilon"], use_final_layernorm=True, hidden_dropout=0.0,
                              attention_dropout=0.0, seed=1, load=a.sat_dir, mode="inference")
    model = GLM130B(args)
    load_checkpoint(model, args)  # raises on any key the model needs and the folder lacks
    model = model.float().eval()
    io = read_safetensors(a.io)
    out = {}
    for key in sorted(k for k in io if k.startswith("input_ids.")):
        case = key.split(".", 1)[1]
        ids = torch.tensor(io[key])
        pos = torch.tensor(io["position_ids." + case])
        B, T = ids.shape
        mask = mif.sat_glm_mask(B, T, [int(p) for p in io["prefix_len." + case]])
        with torch.no_grad(), mif.sat_f32_forward():
            out["logits." + case] = model(ids, pos, mask)[0]
    mif.save_safetensors(a.out, out)
    print("wrote", a.out, sorted(out))


if __name__ == "__main__":
    main()
