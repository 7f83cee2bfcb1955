"""PyTorch/transformers reference computations the tests compare against."""
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(model_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def perplexity(model_dir, texts, device="cpu", dtype=torch.float32):
    """CONTRACT.md's perplexity: every token after the first, tokens with special tokens."""
    model, tok = load(model_dir, dtype)
    model.to(device)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        logp = model(ids).logits[0, :-1].double().log_softmax(-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model_dir, prompts, max_new_tokens):
    """Completion ids of `generate(do_sample=False)`, cut after the first EOS."""
    model, tok = load(model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=True, return_tensors="pt").input_ids
        gen = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)[0, ids.shape[1]:].tolist()
        cut = []
        for t in gen:
            cut.append(t)
            if t in eos:
                break
        out.append(cut)
    return out


@torch.no_grad()
def logits(model_dir, text):
    model, tok = load(model_dir)
    ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids
    return model(ids).logits[0]


def _ids(tok, rec):
    if "text" in rec:
        return tok(rec["text"], add_special_tokens=True).input_ids, 1
    p = tok(rec["prompt"], add_special_tokens=True).input_ids
    c = tok(rec["completion"], add_special_tokens=False).input_ids
    return p + c, len(p)


def _layer_outputs(model, ids):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    res = model(ids, output_attentions=True)
    for h in hooks:
        h.remove()
    return res, outs


@torch.no_grad()
def distill_losses(teacher_dir, student_dir, records, temperature, pairs):
    """Token-weighted means of kd-distill's loss terms on `records`, at the student's
    initial weights: CE and forward-KL KD (x T^2) over completion tokens, hidden MSE and
    attention KL (teacher heads averaged per student head) over all tokens."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation="eager")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(student_dir)
    ce = kd = hid = att = 0.0
    n_loss = n_valid = 0
    for rec in records:
        ids, loss_from = _ids(tok, rec)
        x = torch.tensor([ids])
        ts, th = _layer_outputs(teacher, x)
        ss, sh = _layer_outputs(student, x)
        sl, tl = ss.logits[0, loss_from - 1:-1], ts.logits[0, loss_from - 1:-1]
        tgt = x[0, loss_from:]
        ce += torch.nn.functional.cross_entropy(sl, tgt, reduction="sum").item()
        ls, lt = (sl / temperature).log_softmax(-1), (tl / temperature).log_softmax(-1)
        kd += (lt.exp() * (lt - ls)).sum().item() * temperature ** 2
        n_loss += len(tgt)
        n_valid += len(ids)
        hid += sum(((sh[s] - th[t]) ** 2).mean(-1).sum().item() for s, t in pairs) / len(pairs)
        a_sum = 0.0
        for s, t in pairs:
            sa, ta = ss.attentions[s][0], ts.attentions[t][0]
            g = ta.view(sa.shape[0], -1, *ta.shape[1:]).mean(1)
            a_sum += (g * (g.clamp_min(1e-12).log() - sa.clamp_min(1e-12).log())).sum(-1).mean(0).sum().item()
        att += a_sum / len(pairs)
    return {"ce": ce / n_loss, "kd": kd / n_loss, "hidden": hid / n_valid, "attn": att / n_valid}
