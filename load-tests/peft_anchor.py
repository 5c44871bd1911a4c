"""The PyTorch + PEFT anchor for load-tests/train-bench.sh: LoRA on the same GGUF (dequantized to
fp32 by transformers), the same rows and the same held-out split as the `finetune train` run whose
report.json it is given, the same prompts (the model's chat template) and answer tokens (the answer
and the end-of-turn token), and the same hyper-parameters: rank 8, alpha 16, dropout 0, all linear
layers, AdamW at 1e-3, cosine after 10% warm-up, gradient clipping at 1.0, one epoch, right
padding. Only the training loop is timed; tokens are counted unpadded, prompt and answer.
Prints one JSON line.

Usage: peft_anchor.py MODEL.gguf DATASET.jsonl REPORT.json BATCH
"""
import json
import math
import os
import random
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, dataset, report_path, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(42)
random.seed(42)
torch.set_num_threads(os.cpu_count())
folder, name = os.path.split(os.path.abspath(gguf))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
eot = tok.convert_tokens_to_ids("<|im_end|>")

report = json.load(open(report_path))
val_ids = set(report["val_ids"])
dropped = {d["id"] for d in report["dropped"]}


def encode(row):
    user = "\n".join(x for x in [row["instruction"].strip(), row.get("input", "").strip()] if x)
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    answer = tok(row["output"].strip(), add_special_tokens=False)["input_ids"] + [eot]
    return list(prompt), answer


train, val = [], []
for i, line in enumerate(open(dataset)):
    rid = f"line-{i + 1}"
    if rid in dropped:
        continue
    (val if rid in val_ids else train).append(encode(json.loads(line)))

cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)


def collate(items):
    t = max(len(p) + len(a) for p, a in items)
    ids = torch.zeros((len(items), t), dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    labels = torch.full((len(items), t), -100, dtype=torch.long)
    for r, (p, a) in enumerate(items):
        seq = p + a
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, len(p): len(seq)] = torch.tensor(a)
    return ids, mask, labels


def loss_of(items):
    ids, mask, labels = collate(items)
    logits = model(input_ids=ids, attention_mask=mask).logits
    shift = logits[:, :-1].reshape(-1, logits.size(-1))
    target = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift, target, ignore_index=-100, reduction="sum"), int((target != -100).sum())


steps = math.ceil(len(train) / batch)
warm = math.ceil(0.1 * steps)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
order = list(range(len(train)))
random.shuffle(order)
model.train()
tokens, seconds = 0, 0.0
for s in range(steps):
    items = [train[i] for i in order[s * batch: (s + 1) * batch]]
    started = time.perf_counter()
    loss, n = loss_of(items)
    (loss / n).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    seconds += time.perf_counter() - started
    tokens += sum(len(p) + len(a) for p, a in items)
    print(f"peft step {s + 1}/{steps} loss {loss.item() / n:.4f}", file=sys.stderr)

model.eval()
with torch.no_grad():
    total, count = 0.0, 0
    for k in range(0, len(val), batch):
        loss, n = loss_of(val[k: k + batch])
        total, count = total + loss.item(), count + n
print(json.dumps({
    "trainer": "peft", "batch": batch, "steps": steps, "train_rows": len(train), "val_rows": len(val),
    "tokens": tokens, "train_seconds": seconds, "tokens_per_s": tokens / seconds,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "val_loss": total / max(count, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
}))
