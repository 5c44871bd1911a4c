#!/usr/bin/env python3
"""Embedding throughput, Switchyard over HTTP against sentence-transformers in process, on the
same texts in one run: sentences/s at batch 1 (one sentence per request / encode call) and at
batch 64. Prints one JSON object. Called by load-tests/embed-bench.sh, which starts the server.

Usage: embed_bench.py URL MODEL_DIR [SENTENCES] [ROUNDS]

The two sides are measured in alternation ROUNDS times (default 3) and each keeps its best
round, so a burst of other work on a shared machine hurts neither side more than the other.
"""

import http.client
import json
import os
import random
import sys
import time
import urllib.parse

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a of to and in is for on that with as was by at from this be are or it an which have "
    "order invoice customer refund shipping delay account password reset login error server "
    "database query index search document report meeting schedule budget project deadline team "
    "model training data feedback answer question support ticket priority urgent billing plan "
    "weather city train station airport hotel booking price discount product review quality "
    "battery screen phone laptop network wifi update install version release bug fix test"
).split()


def texts(n, seed=7):
    """Deterministic sentences of 6 to 40 words, typical of search queries and short passages."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 40))]
        out.append(f"{' '.join(words).capitalize()} ({i}).")
    return out


def http_rate(url, model, sentences, batch):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    headers = {"content-type": "application/json"}

    def post(chunk):
        conn.request("POST", "/v1/embeddings", json.dumps({"model": model, "input": chunk}), headers)
        res = conn.getresponse()
        body = res.read()
        if res.status != 200:
            raise SystemExit(f"/v1/embeddings answered {res.status}: {body[:300]!r}")
        return json.loads(body)

    chunks = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
    post(chunks[0])  # warm-up
    start = time.perf_counter()
    for c in chunks:
        post(c)
    return len(sentences) / (time.perf_counter() - start)


def st_rate(model, sentences, batch):
    chunks = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
    model.encode(chunks[0], batch_size=batch)
    start = time.perf_counter()
    for c in chunks:
        model.encode(c, batch_size=batch, convert_to_numpy=True)
    return len(sentences) / (time.perf_counter() - start)


def main():
    url, model_dir = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    model_id = os.path.basename(os.path.normpath(model_dir))
    sentences = texts(n)
    result = {
        "sentences": n,
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
    }
    for batch in (1, 64):
        # Batch 1 uses a quarter of the texts: the same per-sentence cost, a quarter of the wait.
        subset = sentences[: max(64, n // 4)] if batch == 1 else sentences
        ours, theirs = 0.0, 0.0
        for _ in range(rounds):
            ours = max(ours, http_rate(url, model_id, subset, batch))
            theirs = max(theirs, st_rate(st, subset, batch))
        result[f"batch{batch}"] = {
            "switchyard_sentences_per_s": round(ours, 1),
            "sentence_transformers_sentences_per_s": round(theirs, 1),
            "ratio": round(ours / theirs, 2),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
