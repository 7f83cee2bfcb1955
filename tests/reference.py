"""PyTorch/transformers reference computations the tests compare against."""
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(model_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def perplexity(model_dir, texts):
    """CONTRACT.md's perplexity: every token after the first, tokens with special tokens."""
    model, tok = load(model_dir)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids
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
