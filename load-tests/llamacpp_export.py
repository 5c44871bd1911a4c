"""llama.cpp's side of the export check (run by export-llamacpp.sh in a throwaway venv).

Usage: llamacpp_export.py SWITCHYARD_JSON THREADS LABEL=MODEL.gguf [LABEL=MODEL.gguf ...]

SWITCHYARD_JSON is what switchyard-export-check wrote: for each prompt its token ids and the
greedy ids Switchyard's serving runtime generated with the adapter (`adapter_ids`) and without
(`base_ids`). Each GGUF is loaded in llama.cpp and decoded greedily from the same prompt ids
(argmax of the logits, end of sequence ignored); the model labelled `base` is compared with
`base_ids`, every other one (the merged exports) with `adapter_ids`. Prints a markdown table.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def main() -> None:
    ref = json.load(open(sys.argv[1]))
    threads = int(sys.argv[2])
    n = ref["tokens"]
    prompts = ref["prompts"]
    changed = sum(a != b for p in prompts for a, b in zip(p["adapter_ids"], p["base_ids"])) / (n * len(prompts))
    print(f"{len(prompts)} chat prompts, {n} greedy tokens each; Switchyard: serving runtime on the base GGUF "
          f"with the adapter (LoRA in {ref['lora_dtype']}); the adapter changes {changed:.0%} of Switchyard's "
          "greedy tokens against the base.\n")
    print("| llama.cpp model | compared with Switchyard | tokens equal | first token equal | prompts identical |")
    print("|---|---|---:|---:|---:|")
    for spec in sys.argv[3:]:
        label, path = spec.split("=", 1)
        key = "base_ids" if label == "base" else "adapter_ids"
        # logits_all: llama-cpp-python 0.3 fills `scores` only then (else they stay zeros).
        llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True,
                    verbose=False)
        equal = first = whole = 0
        for p in prompts:
            got, want = greedy(llm, p["prompt_ids"], n), p[key]
            same = sum(a == b for a, b in zip(got, want))
            equal += same
            first += got[0] == want[0]
            whole += same == n
        against = "base" if key == "base_ids" else "base + adapter"
        print(f"| {label} ({path.rsplit('/', 1)[-1]}) | {against} | {equal / (n * len(prompts)):.3f} "
              f"| {first / len(prompts):.2f} | {whole}/{len(prompts)} |")
        del llm


if __name__ == "__main__":
    main()
