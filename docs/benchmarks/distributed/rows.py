"""Synthetic training rows for the throughput runs: `python rows.py OUT.jsonl ROWS CHARS` writes ROWS rows of
random lowercase words, CHARS characters each (the config-built models' byte tokenizer makes that CHARS + 2
tokens), the last 64 characters as the completion."""

import json
import random
import sys

out, rows, chars = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
with open(out, "w") as f:
    for _ in range(rows):
        text = " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(chars))
        text = text[:chars]
        f.write(json.dumps({"prompt": text[:-64], "completion": text[-64:]}) + "\n")
