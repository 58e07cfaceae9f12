"""Reliability 4: one loaded runtime serving 8 threads x 25 requests gives exactly the sequential outputs.

Threading model (docs/reliability.md): a :class:`Blip2Runtime` holds one ONNX Runtime session per graph,
shared by every thread (ORT allows concurrent ``run`` on a session; one session per thread would hold the
weights once per thread). Everything that belongs to one request (pixel values, visual prefix, KV cache,
IO binding of the in-place cache, masks, random generator) is created by that request on its own stack.
Graphs are loaded lazily, once, under a lock.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime

THREADS, PER_THREAD = 8, 25
IMAGES = [np.random.default_rng(i).integers(0, 256, (20 + 3 * i, 28 - 2 * i, 3), dtype=np.uint8) for i in range(6)]
PROMPTS = ["", "a photo of", "Question: what color is it? Answer:", "red blue green", "a picture of a", "zebra"]


def _requests(n: int) -> list[dict]:
    """A seeded mix: single images, batches of 2-3, one frame with several questions, beams, sampling."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        kind = rng.choice(["one", "one", "batch", "ask", "beams", "sample"])
        imgs = [rng.randrange(len(IMAGES)) for _ in range(3 if kind == "batch" else 1)]
        prompts = [rng.choice(PROMPTS) for _ in range(2 if kind == "ask" else len(imgs))]
        kw = {"max_new_tokens": rng.randint(2, 8)}
        if kind == "beams":
            kw["num_beams"] = 2
        if kind == "sample":
            kw.update(do_sample=True, top_k=5, seed=rng.randrange(1000))
        out.append({"id": i, "kind": kind, "images": imgs, "prompts": prompts, "kw": kw})
    return out


def _serve(rt: Blip2Runtime, req: dict) -> list[list[int]]:
    imgs = [IMAGES[i] for i in req["images"]]
    if req["kind"] == "ask":
        prefix = rt.image_features(imgs)
        gens = rt.generate(prompts=req["prompts"], prefix=prefix, **req["kw"])
    else:
        gens = rt.generate(imgs, req["prompts"], **req["kw"])
    return [g.token_ids for g in gens]


def _run_threads(rt: Blip2Runtime, reqs: list[dict]) -> tuple[dict[int, list[list[int]]], list[BaseException]]:
    results: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(t: int):
        mine = [r for r in reqs if r["id"] % THREADS == t]
        random.Random(t).shuffle(mine)  # threads do different kinds of work at the same moment
        try:
            start.wait()
            for r in mine:
                out = _serve(rt, r)
                with lock:
                    results[r["id"]] = out
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,), name=f"client-{t}") for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return results, errors


@pytest.mark.parametrize("engines", [True, False], ids=["ort-engine-inplace-kv", "portable-graph"])
def test_eight_threads_match_sequential(tiny_bundle, engines):
    reqs = _requests(THREADS * PER_THREAD)
    seq_rt = Blip2Runtime(tiny_bundle, engines=engines)
    expected = {r["id"]: _serve(seq_rt, r) for r in reqs}
    seq_calls = {g.value: seq_rt.graph(g).calls for g in (GraphName.VISION, GraphName.QFORMER, GraphName.DECODER)}

    rt = Blip2Runtime(tiny_bundle, engines=engines)  # fresh: the threads also race to load the graphs
    loads: list[str] = []
    real_load = rt.backend.load

    def counting_load(bundle, record, *files):
        loads.append(record.name)
        return real_load(bundle, record, *files)

    rt.backend.load = counting_load
    results, errors = _run_threads(rt, reqs)
    assert errors == [], errors[:3]
    assert len(results) == len(reqs)
    mismatched = [i for i in expected if results[i] != expected[i]]
    assert mismatched == [], f"{len(mismatched)} of {len(reqs)} requests differ, e.g. {reqs[mismatched[0]]}"
    assert sorted(loads) == sorted(["vision", "qformer", "decoder"]), loads  # each graph loaded once
    for g, n in seq_calls.items():  # the shared call counters did not lose updates
        assert rt.graph(GraphName(g)).calls == n, (g, rt.graph(GraphName(g)).calls, n)
    print(f"\n{len(reqs)} requests from {THREADS} threads: identical to sequential "
          f"({'ORT engine, in-place KV cache' if engines else 'portable graph'}); graph runs {seq_calls}")


def test_sessions_are_shared_not_per_thread(tiny_bundle):
    rt = Blip2Runtime(tiny_bundle)
    seen: set[int] = set()
    lock = threading.Lock()

    def worker():
        rt.generate([IMAGES[0]], "a photo of", max_new_tokens=2)
        with lock:
            seen.add(id(rt.graph(GraphName.DECODER).session))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == 1


def test_a_failing_request_does_not_disturb_the_others(tiny_bundle):
    """Bad input on some threads (InputError, LimitError) while others generate: the good ones are exact."""
    from runtime.errors import Blip2Error

    rt = Blip2Runtime(tiny_bundle)
    good = _requests(40)
    expected = {r["id"]: _serve(rt, r) for r in good}
    results: dict[int, list[list[int]]] = {}
    refused: list[Blip2Error] = []
    other: list[BaseException] = []
    lock = threading.Lock()

    def bad(i: int):
        try:
            if i % 2:
                rt.generate([b"not an image"], "x")
            else:
                rt.generate([IMAGES[0]], "red " * 500, max_new_tokens=2)
        except Blip2Error as e:
            with lock:
                refused.append(e)
        except BaseException as e:  # noqa: BLE001
            with lock:
                other.append(e)

    def worker(t: int):
        for r in good[t::4]:
            bad(r["id"])
            out = _serve(rt, r)
            with lock:
                results[r["id"]] = out

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert other == [] and len(refused) == len(good)
    assert results == expected
