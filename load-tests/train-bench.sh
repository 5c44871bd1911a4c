#!/usr/bin/env bash
# Training benchmark (issue 6): `finetune train` on the default model with a generated
# 240-row ticket-labelling task (billing / shipping / technical), one run per configuration;
# prints training tokens/s, peak resident set and the held-out accuracy of the base model and
# the trained adapter. Usage: load-tests/train-bench.sh [OUT_DIR]
# Env: EPOCHS (default 1), LR (default: the model-size default, 1e-3 here).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/train}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release/finetune"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
epochs="${EPOCHS:-1}"

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

run() {
  local name=$1; shift
  rm -rf "$out/$name"
  /usr/bin/time -v "$bin" train --base "$model" --dataset "$out/tickets.jsonl" --out "$out/$name" \
    --val-ratio 0.1 --epochs "$epochs" --save-steps 0 ${LR:+--learning-rate "$LR"} "$@" 2> "$out/$name.log"
  python3 - "$out/$name" "$out/$name.log" "$name" <<'PY'
import json, re, sys
d, log, name = sys.argv[1:4]
m = json.load(open(d + "/metrics.json"))
t = m["train"]
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(log).read())
rows = {r["name"]: r for r in m["eval"]}
acc = lambda r: f'{r["correct"]}/{r["total"]}' if r.get("total") else "-"
print(f'| {name} | {t["steps"]} | {t["tokens_per_s"]:.1f} | {t["train_seconds"]:.0f} | '
      f'{int(rss.group(1)) / 1024:.0f} | {acc(rows["base"])} | {acc(rows["candidate"])} | {rows["candidate"]["val_loss"]:.4f} |')
PY
}

echo "machine: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
echo "model: $model; 240 rows (216 train after the 10% split, minus curation drops), $epochs epoch(s)"
echo
echo "| configuration | steps | train tokens/s | train s | peak RSS MiB | base accuracy | adapter accuracy | adapter val loss |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
run "rank8-batch4" --batch-size 4
run "rank8-batch8" --batch-size 8
