"""llama.cpp's numbers for the engine benchmark (run by engine-bench.sh in a throwaway venv).

Measures, in process and greedy, on the same GGUF Switchyard serves:
  - time to first token for a chat prompt (prompt evaluation plus the first logits),
  - decode tokens/s over 128 generated tokens (end-of-sequence ignored),
  - prefill tokens/s of a 600-token prompt.
Prints one JSON object.
"""

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    model, chat_prompt, long_prompt, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    eos = llm.token_eos()

    chat = llm.tokenize(chat_prompt.encode(), add_bos=False, special=True)
    long = llm.tokenize(long_prompt.encode(), add_bos=False, special=True)[:600]

    def greedy_next() -> int:
        logits = np.array(llm.scores[llm.n_tokens - 1], copy=True)
        logits[eos] = -np.inf
        return int(np.argmax(logits))

    best = None
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(chat)
        token = greedy_next()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(127):
            llm.eval([token])
            token = greedy_next()
        decode = 127 / (time.perf_counter() - t1)
        run = {"ttft_ms": ttft * 1e3, "decode_tok_s": decode}
        if best is None or run["decode_tok_s"] > best["decode_tok_s"]:
            best = run

    prefill = 0.0
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long)
        prefill = max(prefill, len(long) / (time.perf_counter() - t0))

    print(json.dumps({
        "chat_prompt_tokens": len(chat),
        "long_prompt_tokens": len(long),
        "ttft_ms": best["ttft_ms"],
        "decode_tok_s": best["decode_tok_s"],
        "prefill_tok_s": prefill,
        "threads": threads,
    }))


if __name__ == "__main__":
    main()
