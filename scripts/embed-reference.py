#!/usr/bin/env python3
"""Writes gateway/tests/fixtures/embeddings-reference.json: 50 varied sentences and the vectors
sentence-transformers gives them with all-MiniLM-L6-v2, the reference `gateway/tests/embeddings.rs`
compares the gateway's /v1/embeddings with (cosine distance at most 1e-4).

Run it from a throwaway venv outside the clone, never inside it:

    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    /tmp/st-venv/bin/python scripts/embed-reference.py [MODEL_DIR]

MODEL_DIR defaults to $SWITCHYARD_TEST_EMBED_MODEL, then ~/.cache/switchyard/models/all-MiniLM-L6-v2
(scripts/fetch-models.sh puts it there). Nothing is downloaded: the model loads from the directory.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "gateway" / "tests" / "fixtures" / "embeddings-reference.json"


def sentences():
    """Short and long, punctuation, unicode, numbers, code, and texts past 256 and 512 tokens."""
    fixed = [
        "Hello world",
        "a",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A man is riding a white horse on an enclosed ground.",
        "A monkey is playing drums.",
        "Someone in a gorilla costume is playing a set of drums.",
        "The quick brown fox jumps over the lazy dog.",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
        "What's the weather like in Zürich today?",
        "Naïve café owners façade résumé coöperate",
        "東京は日本の首都です。",
        "Москва — столица России.",
        "مرحبا بالعالم",
        "🙂 emojis 🚀 and symbols ★ ♥ ©",
        "Γειά σου Κόσμε",
        "Wie geht es Ihnen? Mir geht es gut, danke.",
        "¿Dónde está la biblioteca?",
        "3.14159 is approximately pi; e ≈ 2.71828.",
        "Order #12345 shipped on 2024-03-15 at 14:30 UTC for $1,299.99.",
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
        "Call +1 (555) 010-9999 or write to support@example.com.",
        "fn main() { println!(\"hello\"); }",
        "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
        "!!! ??? ... --- ;;; ::: ,,,",
        "\"Quoted\" 'single' (parens) [brackets] {braces} <angles>",
        "   leading and trailing spaces   ",
        "tabs\tand\nnewlines\r\ninside",
        "https://example.com/path?query=1&other=two#fragment",
        "The patient's blood pressure was 120/80 mmHg and pulse 72 bpm.",
        "Machine learning models can overfit when trained on small datasets.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The Eiffel Tower is located in Paris, France.",
        "I'd rather be sailing.",
        "Don't count your chickens before they hatch.",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "The meeting was moved from Tuesday to Thursday because of the holiday.",
        "Refunds are processed within 5-7 business days after we receive the item.",
        "Invoice total: 4,500 EUR (VAT 19% included).",
        "Can you recommend a good book about the history of Rome?",
        "He said: «C'est la vie» and left.",
    ]
    long = [
        " ".join(
            [
                "Retrieval augmented generation combines a search index with a language model.",
                "Documents are split into chunks, embedded, and stored; at query time the closest",
                "chunks are retrieved and given to the model as context, so that answers can cite",
                "their sources and stay grounded in the company's own documents.",
            ]
        ),
        "A paragraph of about a hundred words: " + " ".join(f"word{i}" for i in range(100)),
        # Past 256 tokens (sentence-transformers' max_seq_length for this model): cut there.
        " ".join(["The committee reviewed the annual budget and approved the new proposal."] * 30),
        # Past 512 tokens, the model's position limit.
        " ".join(f"item {i} costs {i * 3} dollars;" for i in range(200)),
        # Past 512 tokens of unicode and punctuation.
        "Ünïcödé, pünctüätïön & números: " + " ".join(f"«{i}»—¿{i}?" for i in range(300)),
    ]
    out = fixed + long
    assert len(out) == 50, len(out)
    return out


def main():
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = Path(
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get(
            "SWITCHYARD_TEST_EMBED_MODEL", Path.home() / ".cache/switchyard/models/all-MiniLM-L6-v2"
        )
    )
    model = SentenceTransformer(str(model_dir), device="cpu")
    texts = sentences()
    vectors = model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)
    cut = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    whole = model.tokenizer(texts, truncation=False)["input_ids"]
    fixture = {
        "generator": f"scripts/embed-reference.py: sentence-transformers {sentence_transformers.__version__}, "
        f"torch {torch.__version__}, CPU, float32",
        "model": "all-MiniLM-L6-v2",
        "max_seq_length": model.max_seq_length,
        "dimension": int(vectors.shape[1]),
        "items": [
            {
                "text": t,
                "tokens": len(c),
                "truncated": len(w) > len(c),
                "embedding": [float(f"{x:.7g}") for x in v],
            }
            for t, c, w, v in zip(texts, cut, whole, vectors.tolist())
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({len(texts)} sentences, dimension {fixture['dimension']})")


if __name__ == "__main__":
    main()
