"""Reference values for crates/distillery/tests/losses.rs, computed with PyTorch in float64.

Run: .venv/bin/python scripts/golden_losses.py
The inputs are closed-form so the Rust test builds the same tensors without sharing files.
"""
import math

import torch

torch.set_default_dtype(torch.float64)
N, V = 4, 7
i = torch.arange(N)[:, None].double()
j = torch.arange(V)[None, :].double()
S = 3.0 * torch.sin(0.7 * i + 1.3 * j)            # student logits
T = 2.5 * torch.cos(0.4 * i - 0.9 * j + 0.3)      # teacher logits


def lsm(x, temp):
    return (x / temp).log_softmax(-1)


def kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


def div(name, temp, **kw):
    lt, ls = lsm(T, temp), lsm(S, temp)
    if name == "forward":
        d = kl(lt, ls)
    elif name == "reverse":
        d = kl(ls, lt)
    elif name == "jsd":
        b = kw["beta"]
        m = (b * lt.exp() + (1 - b) * ls.exp()).log()
        d = b * kl(lt, m) + (1 - b) * kl(ls, m)
    elif name == "skew":
        lam = kw["lam"]
        m = (lam * lt.exp() + (1 - lam) * ls.exp()).log()
        d = kl(lt, m)
    elif name == "tvd":
        d = 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    return d * temp * temp


print("forward T=1 rows", div("forward", 1.0).tolist())
print("forward T=2 sum", div("forward", 2.0).sum().item())
print("reverse T=2 sum", div("reverse", 2.0).sum().item())
print("jsd b=0.5 T=2 sum", div("jsd", 2.0, beta=0.5).sum().item())
print("jsd b=0.1 T=1 sum", div("jsd", 1.0, beta=0.1).sum().item())
print("skew l=0.1 T=2 sum", div("skew", 2.0, lam=0.1).sum().item())
print("tvd T=2 sum", div("tvd", 2.0).sum().item())
# torch's own KL agrees with the forward KL above:
ref = torch.nn.functional.kl_div(lsm(S, 2.0), lsm(T, 2.0), log_target=True, reduction="sum") * 4
print("torch kl_div T=2 (x T^2)", ref.item())
print("ce sum", torch.nn.functional.cross_entropy(S, torch.tensor([1, 5, 0, 6]), reduction="sum").item())

# Sparse (top-k + tail) teacher, k = 3: buckets = top-3 tokens + one tail bucket.
K = 3
lpt = T.log_softmax(-1)
top, idx = lpt.topk(K, -1)
tail = (1 - top.exp().sum(-1)).log()
for temp in (1.0, 2.0):
    ls = lsm(S, temp)
    ls_top = ls.gather(1, idx)
    ls_b = torch.cat([ls_top, (1 - ls_top.exp().sum(-1, keepdim=True)).log()], 1)
    if temp == 1.0:
        lt_b = torch.cat([top, tail[:, None]], 1)
    else:
        rest = V - K
        joint = torch.cat([top / temp, ((tail - math.log(rest)) / temp + math.log(rest))[:, None]], 1)
        lt_b = joint - joint.logsumexp(-1, keepdim=True)
    print(f"sparse forward T={temp} sum", (kl(lt_b, ls_b) * temp * temp).sum().item())

# Hidden-state matching: [b=2, t=3, h=5], last position of row 1 is padding.
b, t, h = 2, 3, 5
a = torch.arange(b * t * h).double().reshape(b, t, h)
hs = torch.sin(0.3 * a)
ht = torch.cos(0.2 * a + 0.5)
valid = torch.tensor([[1, 1, 1], [1, 1, 0]]).double()
print("hidden mse sum", (((hs - ht) ** 2).mean(-1) * valid).sum().item())
print("hidden cosine sum", ((1 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1)) * valid).sum().item())
print("hidden normalized mse sum", ((((hs - ht) ** 2).mean(-1) / ((ht ** 2).mean(-1) + 1e-6)) * valid).sum().item())

# Attention maps: teacher 4 heads, student 2 heads, [b=2, q=3, k=3], causal rows.
def attn(heads, scale):
    x = torch.arange(b * heads * t * t).double().reshape(b, heads, t, t)
    logits = torch.sin(scale * x)
    mask = torch.ones(t, t).tril().bool()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)

at, as_ = attn(4, 0.37), attn(2, 0.61)
grouped = at.view(b, 2, 2, t, t).mean(2)
klq = (grouped * (grouped.clamp_min(1e-12).log() - as_.clamp_min(1e-12).log())).sum(-1)
print("attention kl sum", (klq.mean(1) * valid).sum().item())
