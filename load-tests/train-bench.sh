#!/usr/bin/env bash
# Training benchmark (issue 25): `finetune train` against PyTorch + PEFT on the same CPU, in one
# run, on the default model and a generated 240-row ticket-labelling task (billing / shipping /
# technical), LoRA rank 8 / alpha 16 on all linear layers, learning rate 1e-3, one epoch, 10%
# held out, at batch 4 and batch 8. PEFT trains on exactly our split (the ids in our report.json)
# with the same prompts, answers and schedule (load-tests/peft_anchor.py). Prints training
# tokens/s (prompt + answer, unpadded), peak resident set, held-out loss, and each as a ratio.
# PEFT is installed in a throwaway venv outside the clone ($PEFT_VENV, default
# ~/.cache/switchyard/peft-venv; torch from PyPI pulls CUDA wheels, about 5.6 GB).
# Usage: load-tests/train-bench.sh [OUT_DIR]. Env: EPOCHS (default 1), BATCHES (default "4 8").
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/train}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release/finetune"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
epochs="${EPOCHS:-1}"
batches="${BATCHES:-4 8}"
venv="${PEFT_VENV:-$HOME/.cache/switchyard/peft-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import peft, torch, transformers, gguf" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.25.0" "peft==0.21.2" "gguf==0.19.0" accelerate
fi

python3 - "$out/tickets.jsonl" <<'PY'
import json, random, sys
random.seed(5)
cores = {
    "billing": ["I was charged twice for my order", "my invoice shows the wrong amount", "I need a refund for the last payment",
                "why did my card get billed again", "the subscription fee went up without notice", "please cancel the charge on my account",
                "I see an unknown payment on my statement", "the discount was not applied to my bill"],
    "shipping": ["my package has not arrived yet", "the tracking number does not work", "the parcel was delivered to the wrong address",
                 "when will my order ship", "the courier left the box damaged", "delivery is three days late",
                 "can I change the delivery address", "the shipment is stuck in customs"],
    "technical": ["the app crashes when I open it", "I cannot log in to my account", "the page shows an error message",
                  "the website is very slow today", "my password reset link is broken", "the update made the app freeze",
                  "notifications stopped working on my phone", "the upload button does nothing"],
}
greet = ["Hi,", "Hello,", "Hey team,", "Good morning,", "Dear support,", ""]
close = ["Thanks.", "Please help.", "Any idea?", "This is urgent.", "Regards.", ""]
labels = list(cores)
with open(sys.argv[1], "w") as f:
    for i in range(240):
        label = labels[i % 3]
        text = " ".join(x for x in [random.choice(greet), random.choice(cores[label]) + ".", random.choice(close)] if x)
        f.write(json.dumps({"instruction": "Classify this support ticket as billing, shipping or technical. Answer with one word.",
                            "input": text, "output": label}) + "\n")
PY

ours() {
  local b=$1 name="ours-batch$1"
  rm -rf "$out/$name"
  /usr/bin/time -v "$bin" train --base "$model" --dataset "$out/tickets.jsonl" --out "$out/$name" \
    --val-ratio 0.1 --epochs "$epochs" --save-steps 0 --batch-size "$b" > "$out/$name.out" 2> "$out/$name.log"
  python3 - "$out/$name" "$out/$name.log" "$b" > "$out/$name.json" <<'PY'
import json, re, sys
d, log, b = sys.argv[1:4]
m = json.load(open(d + "/metrics.json"))
t = m["train"]
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(log).read()).group(1)) / 1024
rows = {r["name"]: r for r in m["eval"]}
acc = lambda r: f'{r["correct"]}/{r["total"]}' if r.get("total") else "-"
print(json.dumps({"trainer": "finetune", "batch": int(b), "steps": t["steps"], "tokens_per_s": t["tokens_per_s"],
                  "train_seconds": t["train_seconds"], "peak_rss_mib": rss, "val_loss": rows["candidate"]["val_loss"],
                  "accuracy": f'{acc(rows["base"])} → {acc(rows["candidate"])}'}))
PY
}

peft() {
  local b=$1 name="peft-batch$1"
  "$venv/bin/python" load-tests/peft_anchor.py "$model" "$out/tickets.jsonl" "$out/ours-batch$b/report.json" "$b" \
    > "$out/$name.json" 2> "$out/$name.log"
}

echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores, $(grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo AVX2 only))"
echo "model: $model; 240 rows (216 train after the 10% split, minus curation drops), $epochs epoch(s), rank 8 all-linear"
for b in $batches; do
  ours "$b"
  peft "$b"
done
python3 - "$out" $batches <<'PY'
import json, sys
out, batches = sys.argv[1], sys.argv[2:]
print()
print("| trainer | batch | steps | train tokens/s | train s | peak RSS MiB | held-out loss | accuracy (base → adapter) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
rows = {}
for b in batches:
    for who in ("ours", "peft"):
        r = json.load(open(f"{out}/{who}-batch{b}.json"))
        rows[(who, b)] = r
        name = "finetune (Switchyard)" if who == "ours" else f'PEFT (torch {r["torch"]}, {r["threads"]} threads)'
        print(f'| {name} | {b} | {r["steps"]} | {r["tokens_per_s"]:.1f} | {r["train_seconds"]:.0f} | '
              f'{r["peak_rss_mib"]:.0f} | {r["val_loss"]:.4f} | {r.get("accuracy", "-")} |')
print()
print("| batch | tokens/s ours / PEFT (target ≥ 1) | peak RSS ours / PEFT (target ≤ 1) | held-out loss ours / PEFT (target ≤ 1.05) |")
print("|---:|---:|---:|---:|")
for b in batches:
    o, p = rows[("ours", b)], rows[("peft", b)]
    print(f'| {b} | {o["tokens_per_s"] / p["tokens_per_s"]:.2f} | {o["peak_rss_mib"] / p["peak_rss_mib"]:.2f} | '
          f'{o["val_loss"] / p["val_loss"]:.2f} |')
if len(batches) > 1:
    first, last = batches[0], batches[-1]
    print(f'\nours, batch {last} / batch {first} tokens/s: '
          f'{rows[("ours", last)]["tokens_per_s"] / rows[("ours", first)]["tokens_per_s"]:.2f} (target ≥ 1)')
PY
