"""PyTorch eager baseline for `glm bench forward`: the same GLM-130B architecture and the same
shapes as the Rust model (post-LN DeepNorm, fused per-head QKV, 1-D RoPE in rotate-half layout,
GeGLU with exact GELU, prefix-bidirectional mask, fp32 softmax, tied head), timed the same way:
median seconds of `iters` runs after one warm-up, forward under no_grad, and forward + cross
entropy + backward. Reads one JSON object on argv[1], prints one JSON object."""
import json, math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(a["threads"])
L, H, N, Fd, V = a["num_layers"], a["hidden_size"], a["num_heads"], a["ffn_hidden_size"], a["vocab_size"]
B, T, iters, D = a["batch"], a["seq"], a["iters"], a["hidden_size"] // a["num_heads"]
alpha = math.sqrt(2 * L)

def rope_tables(pos):  # pos (T,) -> (1, 1, T, D)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    f = pos[:, None].float() * inv[None]
    emb = torch.cat((f, f), -1)
    return emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, D)

def rope(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.ln1, s.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        s.qkv, s.dense = nn.Linear(H, 3 * H), nn.Linear(H, H)
        s.up, s.down = nn.Linear(H, 2 * Fd), nn.Linear(Fd, H)

    def attn(s, x, cos, sin, mask, cache):
        b, t = x.shape[:2]
        qkv = s.qkv(x).view(b, t, N, 3 * D).transpose(1, 2)  # (B, N, T, 3D) per-head q|k|v
        q, k, v = qkv.split(D, -1)
        q, k = rope(q, cos, sin) / math.sqrt(D), rope(k, cos, sin)
        if cache is not None:  # KV cache: [k, v] per layer, grown by concatenation
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[0], cache[1] = k, v
        sc = (q @ k.transpose(-1, -2)).float()
        p = torch.softmax(sc if mask is None else sc + mask, -1)
        return s.dense((p @ v).transpose(1, 2).reshape(b, t, H))

    def forward(s, x, cos, sin, mask, cache=None):
        a_ = s.ln1(x)
        m = s.ln2(alpha * a_ + s.attn(a_, cos, sin, mask, cache))
        u1, u2 = s.up(m).chunk(2, -1)
        return alpha * m + s.down(u1 * F.gelu(u2))

class GLM(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(V, H)
        s.blocks = nn.ModuleList(Block() for _ in range(L))
        s.ln = nn.LayerNorm(H)

    def forward(s, ids, cos, sin, mask, caches=None):
        x = s.emb(ids)
        for i, b in enumerate(s.blocks):
            x = b(x, cos, sin, mask, None if caches is None else caches[i])
        return s.ln(x) @ s.emb.weight.t()

m = GLM()
ids = torch.randint(0, V, (B, T))
cos, sin = rope_tables(torch.arange(T))
allowed = torch.ones(T, T, dtype=torch.bool).tril()
allowed[:, : T // 2] = True
mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))

def timed(fn):
    fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]

def fwd():
    with torch.no_grad():
        m(ids, cos, sin, mask)

def fwd_bwd():
    loss = F.cross_entropy(m(ids, cos, sin, mask).view(-1, V), ids.view(-1))
    loss.backward()
    m.zero_grad(set_to_none=True)

def sgemm_gflops():
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(5):
            t = time.perf_counter(); a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best

@torch.no_grad()
def decode():
    """Batch-1 greedy decoding with the KV cache: prefill `prompt` tokens (bidirectional), then time
    `new` single-token steps."""
    P, new = a["decode_prompt"], a["decode_new"]
    caches = [[None, None] for _ in range(L)]
    c, s_ = rope_tables(torch.arange(P))
    logits = m(ids[:1, :P], c, s_, None, caches)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for i in range(new):
        c, s_ = rope_tables(torch.tensor([P + i]))
        nxt = m(nxt, c, s_, None, caches)[:, -1].argmax(-1, keepdim=True)
    return new / (time.perf_counter() - t)

print(json.dumps({"decode_tokens_per_s": decode(),"torch": torch.__version__, "threads": torch.get_num_threads(), "sgemm_gflops": sgemm_gflops(),
                  "params": sum(p.numel() for p in m.parameters()),
                  "forward_s": timed(fwd), "forward_backward_s": timed(fwd_bwd)}))
