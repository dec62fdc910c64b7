"""PyTorch eager baseline for `glm bench train`: optimizer steps of the GLM model of
shared/anchors/torch_glm.py (imported from the path in the arguments) on the config of one of our
presets, f32 on the CPU, no dropout, timed like the Rust side: median of `steps` steps after
`warmup`. One step = forward, next-token cross entropy over the Part B tokens (the prefix is
ignored, as in a [gMASK] row), backward, clip_grad_norm_, AdamW step, zero_grad.

The weights get our DeepNorm init (glm-model's init.rs), not torch's defaults: with nn.Embedding's
N(0, 1) the tied head's logits start huge (loss > 100), the softmax gradients underflow to
subnormal floats, and the backward GEMMs then run several times slower on x86: a benchmark of
subnormal arithmetic rather than of the model. Reads one JSON object on argv[1], prints one."""
import json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

a = json.loads(sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.abspath(a["model"])))
import torch_glm as tg  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(a["threads"])
B, T = a["batch"], a["seq"]
c = tg.Cfg(vocab=a["vocab_size"], hidden=a["hidden_size"], layers=a["num_layers"], heads=a["num_heads"],
           ffn=a["ffn_hidden_size"], seq=T)
m = tg.GLM(c).train()
with torch.no_grad():  # Xavier-normal (gain beta on v, the output projection and the FFN), N(0, 1/3H)
    H, beta = c.hidden, a["deepnorm_beta"]
    nn.init.normal_(m.emb.weight, 0, (1 / (3 * H)) ** 0.5)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_normal_(mod.weight, gain=beta)
            nn.init.zeros_(mod.bias)
    for b in m.blocks:  # rows q | k | v, each Xavier over H x H: gain 1 on q and k, beta on v
        nn.init.normal_(b.qkv.weight[: 2 * H], 0, (1 / H) ** 0.5)
        nn.init.normal_(b.qkv.weight[2 * H :], 0, beta * (1 / H) ** 0.5)
o = a["optim"]
opt = torch.optim.AdamW(m.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                        weight_decay=o["weight_decay"])
ids = torch.randint(0, c.vocab, (B, T))
targets = ids.roll(-1, 1)  # next-token targets on Part B only
targets[:, : T // 2], targets[:, -1] = -100, -100
pos, mask = torch.arange(T), tg.glm_mask(T, T // 2, "cpu")

def step():
    t0 = time.perf_counter()
    logits = m(ids, pos, mask)
    loss = F.cross_entropy(logits.view(-1, c.vocab), targets.view(-1))
    loss.backward()
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(m.parameters(), o["clip_grad"])
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return dict(step_s=t3 - t0, fwd_bwd_s=t1 - t0, clip_s=t2 - t1, adamw_s=t3 - t2, loss=loss.item())

def sgemm_gflops():
    best = 0.0
    for n in (512, 1024, 2048):
        x, y = torch.randn(n, n), torch.randn(n, n)
        x @ y
        for _ in range(5):
            t = time.perf_counter(); x @ y
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best

for _ in range(a["warmup"]):
    step()
runs = sorted((step() for _ in range(a["steps"])), key=lambda r: r["step_s"])
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "sgemm_gflops": sgemm_gflops(),
                  "params": sum(p.numel() for p in m.parameters()), **runs[len(runs) // 2]}))
