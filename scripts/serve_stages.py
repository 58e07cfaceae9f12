"""Where a served request's model time goes, one at a time and batched: the bound batching can reach.

    PYTHONPATH=. python scripts/serve_stages.py --model demo --model bench

For the bundles of ``scripts/load_test.py`` (exported under --work if missing) it times, in one process and
interleaved (batch 1, 2, 4, 8 in turn, best of --reps), each stage the serving scheduler runs: vision,
Q-Former and prefill per image at batch B, and one decode step at R running rows. With ``T`` the mean
number of tokens the load test's requests generate, one request costs, in model time alone,

    one at a time:  vision(1) + qformer(1) + prefill(1) + T * step(1)
    batched by B:   vision(B)/B + qformer(B)/B + prefill(B)/B + T * step(B)/B     (per image)

and their quotient is the throughput ratio perfect continuous batching of B callers could reach if HTTP,
JSON, image decoding and the scheduler's own Python cost nothing (they cost the same per request in both
servers, so they only pull the measured ratio towards 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def timed(best: dict, key, fn, *args) -> None:
    """Keep in ``best[key]`` the fastest call of ``fn(*args)`` (repeated for at least 0.1 s: short stages get
    many tries)."""
    end = time.perf_counter() + 0.1
    while True:
        t0 = time.perf_counter()
        fn(*args)
        t1 = time.perf_counter()
        best[key] = min(best.get(key, np.inf), t1 - t0)
        if t1 >= end:
            return


def prefill(cache, prefix, ids) -> None:
    cache.reset()
    cache.admit(prefix, ids)


def step(cache, tokens) -> None:
    cache.step(tokens)
    cache.lengths[:len(tokens)] -= 1  # the same position again: every step costs the same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=["demo", "bench", "mid", "tiny"], default=None)
    ap.add_argument("--reps", type=int, default=5, help="Interleaved rounds (the fastest call is kept).")
    ap.add_argument("--threads", type=int, default=None, help="ORT threads (default: ORT's, as the servers).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/blip2-load-test"))
    a = ap.parse_args()
    from load_test import PROMPTS, build_bundle, sample_images

    from runtime.contract import GraphName
    from runtime.pipeline import Blip2Runtime
    from runtime.serving.slots import SlotCache

    batches = (1, 2, 4, 8)
    for model in a.model or ["demo"]:
        bundle = build_bundle(model, a.work)
        rt = Blip2Runtime(bundle, **({"threads": a.threads} if a.threads else {}))
        max_tokens = 16 if model == "demo" else 24
        images = sample_images()
        tokens = [len(g.token_ids) for im in images for p in PROMPTS
                  for g in rt.generate([im], [p], max_new_tokens=max_tokens)]
        T = float(np.mean(tokens))
        cfg = rt.generation_config(max_new_tokens=max_tokens)
        ids = rt.encode_prompts([PROMPTS[1]], cfg)[0]
        pv1 = rt.pixel_values([images[0]])
        vision, qformer = rt.graph(GraphName.VISION), rt.graph(GraphName.QFORMER)
        prefix1 = rt.image_features(pv1)
        capacity = rt.manifest.model.max_context if model == "demo" else 128
        cache = SlotCache(rt.manifest, rt.graph(GraphName.DECODER), rt.embed, slots=max(batches), capacity=capacity)
        best: dict[tuple[str, int], float] = {}
        for rep in range(a.reps + 1):  # the first round warms up (not kept)
            for B in batches:
                pv = np.concatenate([pv1] * B)
                emb = vision.run({"pixel_values": pv})["image_embeds"]
                prefix = np.concatenate([prefix1] * B)
                timed(best, ("vision", B), vision.run, {"pixel_values": pv})
                timed(best, ("qformer", B), qformer.run, {"image_embeds": emb})
                timed(best, ("prefill", B), prefill, cache, prefix, [ids] * B)
                timed(best, ("step", B), step, cache, np.full(B, 5))
            if rep == 0:
                best.clear()
        print(f"== {model}: model time per request (ms, fastest call over {a.reps} interleaved rounds; load average "
              f"{os.getloadavg()[0]:.1f}), {T:.1f} tokens per request on average")
        print("| batch | vision / image | Q-Former / image | prefill / image | decode step | per request | ratio |")
        print("|---|---|---|---|---|---|---|")
        one = None
        for B in batches:
            v, q, p, s = (best[(k, B)] * 1e3 / B for k in ("vision", "qformer", "prefill", "step"))
            total = v + q + p + T * s
            one = one or total
            print(f"| {B} | {v:.2f} | {q:.2f} | {p:.2f} | {best[('step', B)] * 1e3:.2f} ({s:.2f} / row) | "
                  f"{total:.2f} | {one / total:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
