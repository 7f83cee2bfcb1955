"""Tiny random checkpoints of every supported architecture, built with `transformers`.

Used by the tests and benchmarks; no weights are committed. Weights are drawn wider than
transformers' default init so that logits are peaked and greedy decoding is not decided by
rounding noise.
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model distills its knowledge into a smaller student model.",
    "Knowledge distillation trains the student on soft targets from the teacher.",
    "In the beginning God created the heaven and the earth.",
    "It was the best of times, it was the worst of times.",
    "Numbers like 12345 and 2026 appear in text, as do symbols: #, %, &.",
] * 20

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def build_tokenizer(out_dir, vocab_size=300):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)
    return fast


def make_config(arch, vocab):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=64, n_layer=3, n_head=4, n_positions=128, **common
        )
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        kw["rope_theta"] = 500000.0
    if arch == "mistral":
        kw["sliding_window"] = 24
    if arch == "qwen2":
        kw["tie_word_embeddings"] = True
    if arch == "qwen3":
        kw["head_dim"] = 32
        kw["num_key_value_heads"] = 1
    return AutoConfig.for_model(arch, **kw)


def make_model(arch, out_dir, seed=0, std=0.15, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    fast = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = make_config(arch, len(fast))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or "ln_f" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    arch, out = sys.argv[1], sys.argv[2]
    make_model(arch, out)
    print(json.dumps(json.load(open(os.path.join(out, "config.json"))), indent=1))
