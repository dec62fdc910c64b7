#!/usr/bin/env python3
"""Small files written by torch.save itself, for the Rust torch reader (fixtures/torch/).

Needs a torch (Debian's python3-torch 1.13.1 made the committed files):
    apt-get install --no-install-recommends -y python3-torch
    /usr/bin/python3 scripts/make_torch_fixtures.py [OUT]   # default fixtures/torch

Writes
  views.pt      a flat state dict with every storage type glm-rs reads (f32, f16, bf16, f64, int8,
                uint8, int16, int32, int64, bool), strided views that share one storage, a
                transposed view, an nn.Parameter, a 0-d tensor, an empty tensor and non-tensor
                entries (which a reader skips)
  nested.pt     {"model": {"language_model": {...}}, "iteration": 7}: a state dict two keys deep
  module.pt     {"module": {...}}: SAT's layout
  legacy.pt     the pre-1.6 (non-zip) format, which the reader refuses with a clear message
  expected.json every tensor of the three zip files: dtype, shape and values (row-major)
"""
import json, os, sys
import torch

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "torch")
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(7)
base = torch.randn(4, 6, generator=g)
views = {
    "f32": torch.randn(2, 3, generator=g),
    "f16": torch.randn(3, 2, generator=g).half(),
    "bf16": torch.randn(5, generator=g).bfloat16(),
    "f64": torch.randn(2, 2, generator=g).double(),
    "i8": torch.tensor([[-128, -1, 0], [1, 7, 127]], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
    "i16": torch.tensor([-300, 300], dtype=torch.int16),
    "i32": torch.tensor([-70000, 70000], dtype=torch.int32),
    "i64": torch.tensor([-(2**40), 2**40], dtype=torch.int64),
    "bool": torch.tensor([True, False, True]),
    "cols": base[:, 1:3],          # a strided view into base's storage
    "rows": base[1:3],             # a contiguous view with an offset, same storage
    "transposed": base.t(),
    "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "step": 12,                    # not a tensor
    "names": ["a", "b"],
}
torch.save(views, os.path.join(out, "views.pt"))
inner = {"w": torch.randn(2, 2, generator=g).half()}
torch.save({"model": {"language_model": inner}, "iteration": 7}, os.path.join(out, "nested.pt"))
module = {"transformer.word_embeddings.weight": torch.randn(4, 2, generator=g).half()}
torch.save({"module": module}, os.path.join(out, "module.pt"))
torch.save({"w": torch.ones(2)}, os.path.join(out, "legacy.pt"), _use_new_zipfile_serialization=False)

def describe(d):
    r = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous()
            vals = t.to(torch.float64).flatten().tolist() if t.dtype != torch.bool else [int(x) for x in t.flatten().tolist()]
            r[k] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "values": vals}
    return r

json.dump({"generator": f"torch {torch.__version__}", "views.pt": describe(views), "nested.pt": describe(inner),
           "module.pt": describe(module)}, open(os.path.join(out, "expected.json"), "w"), indent=1)
print("wrote", sorted(os.listdir(out)))
