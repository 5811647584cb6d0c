"""QLR-LoRA against the stock PEFT + bitsandbytes + TRL stack: tokens/s, step time, memory, MFU (qlrlora/throughput.py).

    python tools/bench_throughput.py all OUT [--micro-batches 2 8] [--seq 2048] [--steps 20]
    python tools/bench_throughput.py report OUT/throughput.json
"""

import sys

from qlrlora.throughput import main

if __name__ == "__main__":
    sys.exit(main())
