"""Reliability 5: 1,000 consecutive generations keep resident memory growth under 5% after warm-up.

The generations run in a child process that imports only the runtime (numpy, tokenizers, onnxruntime:
what an edge device runs), so the 5% is measured against the runtime's own footprint (~100 MiB), not
against a test process that also holds torch and transformers. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WARMUP, N, MAX_GROWTH = 100, 1000, 0.05

CHILD = textwrap.dedent("""
    import gc, json, random, sys
    import numpy as np
    import psutil
    from runtime.pipeline import Blip2Runtime

    bundle, engines, warmup, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    assert "torch" not in sys.modules
    images = [np.random.default_rng(i).integers(0, 256, (16 + 4 * i, 40 - 3 * i, 3), dtype=np.uint8)
              for i in range(5)]
    prompts = ["", "a photo of", "Question: what is in the picture? Answer:", "red blue", "zebra unknown words"]
    rt = Blip2Runtime(bundle, engines=engines)
    rng = random.Random(0)
    proc = psutil.Process()

    def rss():
        gc.collect()
        return proc.memory_info().rss

    def one(i):
        batch = 1 + (i % 3 == 0)  # batches of 1 and 2, beams every 10th: the cache shapes vary
        out = rt.generate([rng.choice(images) for _ in range(batch)], [rng.choice(prompts) for _ in range(batch)],
                          max_new_tokens=4, num_beams=2 if i % 10 == 0 else 1)
        assert len(out) == batch and all(len(g.token_ids) >= 1 for g in out)

    for i in range(warmup):
        one(i)
    samples = [rss()]
    for i in range(n):
        one(warmup + i)
        if (i + 1) % 100 == 0:
            samples.append(rss())
    print(json.dumps({"samples": samples, "generations": n}))
""")


@pytest.mark.parametrize("engines", [True, False], ids=["ort-engine-inplace-kv", "portable-graph"])
def test_thousand_generations_do_not_grow_memory(tiny_bundle, engines):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tiny_bundle), "1" if engines else "0", str(WARMUP), str(N)],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    samples = report["samples"]
    assert report["generations"] == N and len(samples) == N // 100 + 1
    base, end, peak = samples[0], samples[-1], max(samples)
    growth = (end - base) / base
    print(f"\nsoak ({'ORT engine, in-place KV cache' if engines else 'portable graph'}): RSS after {WARMUP} "
          f"warm-up generations {base / 2**20:.1f} MiB, after {N} more {end / 2**20:.1f} MiB "
          f"(peak {peak / 2**20:.1f}), growth {growth * 100:+.2f}% (limit {MAX_GROWTH * 100:.0f}%); "
          f"every 100: {' '.join(f'{s / 2**20:.1f}' for s in samples)} MiB")
    assert growth < MAX_GROWTH, f"RSS grew {growth * 100:.2f}% over {N} generations"
    assert (peak - base) / base < MAX_GROWTH, f"RSS peaked {100 * (peak - base) / base:.2f}% above warm-up"
