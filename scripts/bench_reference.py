"""The PyTorch reference a strong practitioner would write: transformers models with SDPA
attention, the same KD loss, bf16 autocast when asked (on the CPU too), `torch.optim.AdamW`
with `fused=True`, and optionally `torch.compile` (`--compile`; bench_smollm2.py reports the best of
the variants). Run by scripts/bench.py in its own process so its time
and peak memory are measured alone. Prints one JSON line.

    python scripts/bench_reference.py distill --teacher T --student S --batch 8 --seq 128 --steps 20
    python scripts/bench_reference.py generate --teacher T --batch 8 --prompt-len 16 --new 64
    python scripts/bench_reference.py eval --teacher T --batch 8 --seq 128 --batches 10
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device):
    if device.startswith("cuda"):
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}
    return {}


def load(path, device, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)


def adamw(params, device):
    """Fused AdamW where this torch has it for the device (CUDA, and CPU since 2.4)."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)


def batch_ids(vocab, batch, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def distill(a):
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    teacher = load(a.teacher, a.device, dtype).eval()
    # fp32 master weights with bf16 autocast, the standard mixed-precision recipe.
    student = load(a.student, a.device, torch.float32).train()
    if a.gradient_checkpointing:
        # transformers' activation checkpointing, the non-reentrant variant PyTorch recommends.
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = adamw(list(student.parameters()), a.device)
    if a.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)
    vocab = student.config.vocab_size
    ids = batch_ids(vocab, a.batch, a.seq, a.device)
    T, alpha, beta = 2.0, 0.5, 0.5
    times = []
    for step in range(a.steps):
        sync(a.device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.bf16):
            with torch.no_grad():
                t_logits = teacher(ids).logits[:, :-1].float()
            s_logits = student(ids).logits[:, :-1].float()
        tgt = ids[:, 1:]
        ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, vocab), tgt.reshape(-1))
        ls = (s_logits / T).log_softmax(-1)
        lt = (t_logits / T).log_softmax(-1)
        kd = (lt.exp() * (lt - ls)).sum(-1).mean() * T * T
        loss = alpha * ce + beta * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(a.device)
        times.append(time.perf_counter() - t0)
    # Median over the steps after warm-up: robust to a neighbour's burst on a shared machine.
    step_s = statistics.median(times[a.warmup:])
    return {"step_seconds": step_s, "tokens_per_second": a.batch * a.seq / step_s, **peak_memory(a.device)}


def on_policy(a):
    """One GKD step as TRL's GKDTrainer takes it, eagerly: the student samples completions
    with transformers' `generate`, the teacher scores them, and the student minimises the
    generalized JSD (beta 0.5, temperature 1) over completion tokens; the three parts timed."""
    teacher = load(a.teacher, a.device, torch.float32).eval()
    student = load(a.student, a.device, torch.float32)
    opt = adamw(list(student.parameters()), a.device)
    vocab = student.config.vocab_size
    prompts = batch_ids(vocab, a.batch, a.prompt_len, a.device, seed=1)
    beta = torch.tensor(0.5)
    parts = {"sample_seconds": [], "teacher_seconds": [], "update_seconds": []}
    for step in range(a.steps):
        sync(a.device)
        t0 = time.perf_counter()
        student.eval()
        with torch.no_grad():
            seqs = student.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
                                    top_p=1.0, max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=2)
        student.train()
        sync(a.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            t_lp = teacher(seqs).logits[:, a.prompt_len - 1:-1].float().log_softmax(-1)
        sync(a.device)
        t2 = time.perf_counter()
        s_lp = student(seqs).logits[:, a.prompt_len - 1:-1].float().log_softmax(-1)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log(1 - beta), t_lp + torch.log(beta)]), dim=0)
        jsd = beta * (t_lp.exp() * (t_lp - mix)).sum(-1) + (1 - beta) * (s_lp.exp() * (s_lp - mix)).sum(-1)
        jsd.mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(a.device)
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(v)
    totals = [sum(x) for x in zip(*parts.values())]
    out = {k: statistics.median(v[a.warmup:]) for k, v in parts.items()}
    out["step_seconds"] = statistics.median(totals[a.warmup:])
    out["tokens_per_second"] = a.batch * a.new / out["step_seconds"]
    return {**out, **peak_memory(a.device)}


@torch.no_grad()
def generate(a):
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    model = load(a.teacher, a.device, dtype).eval()
    ids = batch_ids(model.config.vocab_size, a.batch, a.prompt_len, a.device, seed=1)
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    sync(a.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=a.new, min_new_tokens=a.new,
                         eos_token_id=None)
    sync(a.device)
    secs = time.perf_counter() - t0
    new = (out.shape[1] - a.prompt_len) * a.batch
    return {"seconds": secs, "tokens_per_second": new / secs, **peak_memory(a.device)}


@torch.no_grad()
def evaluate(a):
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    model = load(a.teacher, a.device, dtype).eval()
    vocab = model.config.vocab_size
    if a.compile:
        model = torch.compile(model)
    batches = [batch_ids(vocab, a.batch, a.seq, a.device, seed=i) for i in range(a.batches)]
    model(batches[0])
    if a.compile:
        model(batches[1 % len(batches)])  # a second call, in case the first one's guards recompile
    sync(a.device)
    t0 = time.perf_counter()
    nll = 0.0
    for ids in batches:
        logp = model(ids).logits[:, :-1].float().log_softmax(-1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
    sync(a.device)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens_per_second": a.batches * a.batch * a.seq / secs, **peak_memory(a.device)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["distill", "generate", "eval", "on-policy"])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true", help="distill: recompute the student's layers in backward")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"distill": distill, "generate": generate, "eval": evaluate, "on-policy": on_policy}[a.mode](a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
