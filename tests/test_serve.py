"""`blip2-export serve`: the OpenAI chat API over continuous batching, talked to with the real openai client.

The main server runs as `blip2-export serve` in a subprocess where importing torch fails (an edge box).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (the dev extra)")
pytest.importorskip("fastapi", reason="blip2-export serve needs the serve extra")

from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime
from runtime.serving.slots import SlotCache
from runtime.serving.text import TextAssembler
from tests.serve_tools import SLOW_SERVER, ServerProcess, data_url, get, image, messages, metric, post

PROMPTS = ["", "a photo of", "Question: what colour is the large shape on the left? Answer:", "two"]


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Blip2Runtime(tiny_bundle)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    from tests.conftest import NO_TORCH_SITECUSTOMIZE

    site = tmp_path_factory.mktemp("no-torch-site")
    (site / "sitecustomize.py").write_text(NO_TORCH_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(os.path.dirname(os.path.dirname(__file__)))]))
    s = ServerProcess([str(tiny_bundle), "--max-batch", "4", "--max-queue", "32", "--model-name", "tiny",
                       "--max-body-mb", "1"], env=env)
    yield s
    s.stop()


def alone(rt, image_seed, prompt, **kw):
    return rt.generate([image(image_seed)], [prompt], **kw)[0]


def test_greedy_text_equals_blip2_export_run(server, rt, tiny_bundle, tmp_path):
    client = server.client()
    for seed, prompt in [(0, ""), (1, PROMPTS[2])]:
        path = tmp_path / f"img{seed}.png"
        from tests.serve_tools import png_bytes

        path.write_bytes(png_bytes(image(seed)))
        cmd = [sys.executable, "-m", "blip2_export.cli", "run", str(tiny_bundle), "-i", str(path), "--json",
               *(["-p", prompt] if prompt else [])]
        ran = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        r = client.chat.completions.create(model="tiny", messages=messages(data_url(image(seed)), prompt or None),
                                           temperature=0)
        assert r.choices[0].message.content == ran["text"]
        assert r.choices[0].finish_reason == ("stop" if ran["finished"] else "length")
        n_prompt = rt.manifest.model.num_query_tokens + len(rt.tokenizer.encode(prompt))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(ran["token_ids"]))


def test_stream_chunks_concatenate_to_the_same_text(server, rt):
    client = server.client()
    for seed, prompt in [(2, PROMPTS[1]), (3, PROMPTS[3])]:
        whole = client.chat.completions.create(model="tiny", messages=messages(data_url(image(seed)), prompt),
                                               max_tokens=20)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages(data_url(image(seed)), prompt),
                                                     max_tokens=20, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content == alone(rt, seed, prompt, max_new_tokens=20).text
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_each_get_their_own_greedy_answer(server, rt):
    """12 callers at once, different prompt lengths and max_tokens, joining the running batch at different
    steps: every answer is token for token what generate gives that request alone."""
    client = server.client()
    jobs = [(seed, PROMPTS[seed % 4], 6 + 3 * (seed % 5)) for seed in range(12)]
    got: dict[int, str] = {}
    steps_before = metric(server.base, "blip2_batch_size_count")
    multi_before = metric(server.base, "blip2_batch_size_bucket", 'le="1.0"')

    start = threading.Barrier(len(jobs))

    def call(job):
        seed, prompt, n = job
        start.wait()  # all at once, then a millisecond apart: they arrive while others decode
        time.sleep(0.001 * seed)
        r = client.chat.completions.create(model="tiny", messages=messages(data_url(image(seed)), prompt),
                                           max_tokens=n, temperature=0)
        got[seed] = r.choices[0].message.content

    threads = [threading.Thread(target=call, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {seed: alone(rt, seed, prompt, max_new_tokens=n).text for seed, prompt, n in jobs}
    steps = metric(server.base, "blip2_batch_size_count") - steps_before
    single = metric(server.base, "blip2_batch_size_bucket", 'le="1.0"') - multi_before
    assert steps > single  # some decode steps ran several requests' rows together


def test_slots_admit_newcomers_mid_decode_token_identical(tiny_bundle):
    """The slot cache, driven directly: requests with different prompt lengths join at different steps and
    leave when done (rows move), on the in-place engine and on the portable graph."""
    for engines in (True, False):
        r = Blip2Runtime(tiny_bundle, engines=engines)
        dec = r.graph(GraphName.DECODER)
        assert dec.facts.kv_cache == ("shared_buffer" if engines else "concat")
        cfg = r.generation_config(max_new_tokens=10, min_new_tokens=10)
        want = {i: alone(r, i, PROMPTS[i % 4], max_new_tokens=10, min_new_tokens=10).token_ids for i in range(6)}
        cache = SlotCache(r.manifest, dec, r.embed, slots=3, capacity=64)
        arrivals = {0: [0, 1], 2: [2], 4: [3, 4], 5: [5]}
        rows: list[int] = []
        out: dict[int, list[int]] = {i: [] for i in range(6)}
        waiting: list[int] = []
        logits = np.zeros((0, r.manifest.model.vocab_size), np.float32)
        for step in range(40):
            waiting += arrivals.get(step, [])
            take, waiting = waiting[:cache.free], waiting[cache.free:]
            if take:
                prefix = r.image_features([image(i) for i in take])
                ids = r.encode_prompts([PROMPTS[i % 4] for i in take], cfg)
                logits = np.concatenate([logits, cache.admit(prefix, ids)])
                rows += take
            tokens = np.argmax(logits, axis=1)
            for b, i in enumerate(rows):
                out[i].append(int(tokens[b]))
            for b in sorted([b for b, i in enumerate(rows) if len(out[i]) == 10], reverse=True):
                moved = cache.retire(b)
                if moved is not None:
                    rows[b], tokens[b] = rows[moved], tokens[moved]
                rows.pop()
                tokens = tokens[:-1]
            logits = cache.step(tokens) if rows else logits[:0]
        assert out == want, f"engines={engines}"


def test_sampling_with_a_seed_is_what_the_runtime_samples_alone(server, rt):
    client = server.client()
    msgs = messages(data_url(image(5)), PROMPTS[1])
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0.9, top_p=0.95, seed=7,
                                       max_tokens=12, n=2)
    want = alone(rt, 5, PROMPTS[1], do_sample=True, temperature=0.9, top_p=0.95, seed=7, max_new_tokens=12).text
    assert r.choices[0].message.content == want  # choice i samples with seed + i
    want1 = alone(rt, 5, PROMPTS[1], do_sample=True, temperature=0.9, top_p=0.95, seed=8, max_new_tokens=12).text
    assert r.choices[1].message.content == want1


def test_beam_search_runs_on_the_serial_lane(server, rt):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=messages(data_url(image(6)), ""), max_tokens=10,
                                       extra_body={"num_beams": 3})
    assert r.choices[0].message.content == alone(rt, 6, "", max_new_tokens=10, num_beams=3).text


def test_stop_strings_cut_the_text(server, rt):
    client = server.client()
    full = alone(rt, 7, "", max_new_tokens=20).text
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    r = client.chat.completions.create(model="tiny", messages=messages(data_url(image(7))), max_tokens=20, stop=stop)
    assert r.choices[0].message.content == full[:full.index(stop)].strip()
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tiny", messages=messages(data_url(image(7))), max_tokens=20,
                                            stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_text_assembler_holds_back_what_may_change():
    class Tok:
        def decode(self, ids):
            return "".join(ids)

    a = TextAssembler(Tok(), stop=("STOP",))
    pieces = [a.update(list(" hello wor"))[0], a.update(list(" hello world ST"))[0]]
    assert pieces == ["hello wor", "ld"]  # leading space dropped; "ST" may begin the stop string
    assert a.update(list(" hello world STOP and more")) == ("", True)
    assert a.final(list(" hello world STOP and more")) == ("hello world", "")


def test_errors_arrive_as_openai_exceptions(server):
    client = server.client()
    url = data_url(image(0))
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        client.chat.completions.create(model="tiny", messages=messages("https://example.com/cat.png"))
    with pytest.raises(openai.BadRequestError, match="exactly one image"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}])
    with pytest.raises(openai.BadRequestError, match="image cannot be used"):
        client.chat.completions.create(model="tiny", messages=messages(data_url(b"not an image at all")))
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model="tiny", messages=messages("data:image/png;base64,@@@"))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=messages(url), temperature=5)
    with pytest.raises(openai.BadRequestError, match="exceed"):
        client.chat.completions.create(model="tiny", messages=messages(url, "word " * 200))
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages(url))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=messages(data_url(b"x" * 2_000_000)))
    assert e.value.status_code == 413
    # malformed JSON and wrong types: 400 in OpenAI's error shape, never a crash
    for body in (b"{not json", b"[1, 2]", b'{"messages": "hi"}', b"\xff\xfe"):
        status, err, _ = post(f"{server.base}/v1/chat/completions", body)
        assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}, (body, err)
    status, err, _ = post(f"{server.base}/v1/chat/completions", b"a=1", content_type="application/x-www-form-urlencoded")
    assert status == 415 and "error" in err
    status, err, _ = post(f"{server.base}/v1/nowhere", b"{}")
    assert status == 404 and err["error"]["type"] == "not_found_error"
    # still serving
    assert client.chat.completions.create(model="tiny", messages=messages(url), max_tokens=3).choices


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    status, body = get(f"{server.base}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    _, text = get(f"{server.base}/metrics")
    for name in ("blip2_queue_depth", "blip2_running_requests", "blip2_batch_size_bucket", "blip2_tokens_per_second",
                 "blip2_request_latency_seconds_bucket", "blip2_time_to_first_token_seconds_bucket",
                 "blip2_generated_tokens_total"):
        assert name in text, name


def test_queue_full_is_429_with_retry_after(tiny_bundle):
    s = ServerProcess([str(tiny_bundle), "0.05", json.dumps({"max_batch": 1, "max_queue": 1})], code=SLOW_SERVER)
    try:
        client = s.client()
        results: list = []

        def call():
            try:
                r = client.chat.completions.create(model=None, messages=messages(data_url(image(1))), max_tokens=30,
                                                   extra_body={"min_tokens": 30})
                results.append(("ok", r.usage.completion_tokens))
            except openai.RateLimitError as e:
                results.append(("429", e.response.headers.get("retry-after")))

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        assert len(results) == 5  # every caller got exactly one answer
        assert sorted(k for k, _ in results).count("ok") == 2  # one running, one waiting
        assert all(v is not None and int(v) >= 1 for k, v in results if k == "429")
        assert all(v == 30 for k, v in results if k == "ok")
    finally:
        s.stop()


def test_timeout_is_504_and_frees_the_slot(tiny_bundle):
    s = ServerProcess([str(tiny_bundle), "0.02", json.dumps({"max_batch": 2, "timeout": 0.5})], code=SLOW_SERVER)
    try:
        client = s.client()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=None, messages=messages(data_url(image(1))), max_tokens=100,
                                           extra_body={"min_tokens": 100})
        assert e.value.status_code == 504
        chunks = client.chat.completions.create(model=None, messages=messages(data_url(image(1))), max_tokens=100,
                                                extra_body={"min_tokens": 100}, stream=True)
        with pytest.raises(openai.APIError, match="timeout"):
            list(chunks)
        assert metric(s.base, "blip2_requests_total", 'status="timeout"') == 2
        assert metric(s.base, "blip2_running_requests") == 0
        r = client.chat.completions.create(model=None, messages=messages(data_url(image(1))), max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        s.stop()


def test_disconnecting_clients_free_their_slots(tiny_bundle):
    s = ServerProcess([str(tiny_bundle), "0.02", json.dumps({"max_batch": 2})], code=SLOW_SERVER)
    try:
        client = s.client()
        for _ in range(2):  # streaming callers that read two chunks and hang up
            stream = client.chat.completions.create(model=None, messages=messages(data_url(image(2))),
                                                    max_tokens=100, extra_body={"min_tokens": 100}, stream=True)
            it = iter(stream)
            next(it), next(it)
            stream.close()
        quick = s.client(timeout=0.5)  # a non-streaming caller that gives up
        with pytest.raises(openai.APITimeoutError):
            quick.chat.completions.create(model=None, messages=messages(data_url(image(3))), max_tokens=100,
                                          extra_body={"min_tokens": 100})
        end = time.monotonic() + 10
        while time.monotonic() < end and metric(s.base, "blip2_requests_total", 'status="cancelled"') < 3:
            time.sleep(0.1)
        assert metric(s.base, "blip2_requests_total", 'status="cancelled"') == 3
        assert metric(s.base, "blip2_client_disconnects_total") == 3
        assert metric(s.base, "blip2_running_requests") == 0
        r = client.chat.completions.create(model=None, messages=messages(data_url(image(1))), max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny_bundle):
    s = ServerProcess([str(tiny_bundle), "0.01", json.dumps({"max_batch": 4})], code=SLOW_SERVER)
    client = s.client()
    done: list = []

    def call(i):
        try:
            r = client.chat.completions.create(model=None, messages=messages(data_url(image(i))), max_tokens=60,
                                               extra_body={"min_tokens": 60})
            done.append(r.usage.completion_tokens)
        except Exception as e:  # noqa: BLE001
            done.append(repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all six admitted or queued, none finished (60 tokens x 10 ms)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
        client.chat.completions.create(model=None, messages=messages(data_url(image(0))), max_tokens=2)
    for t in threads:
        t.join(60)
    rc, _, err = s.stop()
    assert done == [60] * 6, done  # every in-flight request finished, none twice
    assert rc in (0, -signal.SIGTERM)  # uvicorn ends by the signal once the requests are answered
    assert '"done": 6' in err


def test_t5_bundles_run_on_the_serial_lane(tmp_path):
    """An encoder-decoder bundle has no KV slots: its requests run one at a time through generate, with the
    same queue, events and streaming."""
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import make_random_checkpoint
    from runtime.serving.scheduler import Request, Scheduler, SchedulerConfig

    ck = make_random_checkpoint(tmp_path / "ckpt", "tiny", seed=0, llm="t5")
    r = Blip2Runtime(export_bundle(ck, tmp_path / "bundle", ExportConfig(max_context=128), progress=False))
    sched = Scheduler(r, SchedulerConfig(max_batch=4, max_queue=8)).start()
    assert sched.cache is None
    cfg = r.generation_config(max_new_tokens=8)
    got: dict[int, list] = {i: [] for i in range(3)}
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(ev):
            got[i].append(ev)
            if ev.kind != "token":
                done.release()
        return on_event

    for i in range(3):
        pv = r.pixel_values([image(i)])
        sched.submit(Request(pv, PROMPTS[i], r.encode_prompts([PROMPTS[i]], cfg)[0], cfg, listener(i)))
    for _ in range(3):
        assert done.acquire(timeout=60)
    sched.close()
    for i in range(3):
        final = got[i][-1]
        assert final.kind == "done"
        assert final.text == alone(r, i, PROMPTS[i], max_new_tokens=8).text
        assert "".join(e.text for e in got[i][:-1]) == final.text


def test_newcomers_a_few_ms_apart_are_admitted_together(tiny_bundle, monkeypatch):
    """Closed-loop callers arrive a few ms apart: with an admission window the scheduler waits (bounded) for
    them and runs their vision + prefill as one batch; without one, each is admitted as it comes. Either way
    every answer is what generate gives that request alone, and a one-slot scheduler never waits."""
    from runtime.serving import scheduler as sched_mod
    from runtime.serving.scheduler import Request, Scheduler, SchedulerConfig, SchedulerObserver

    r = Blip2Runtime(tiny_bundle)
    cfg = r.generation_config(max_new_tokens=6)
    monkeypatch.setattr(sched_mod, "ADMIT_WAIT_SHARE", 1e9)  # the budget is the window (tiny admissions are fast)

    class Admits(SchedulerObserver):
        def __init__(self):
            self.sizes: list[int] = []

        def on_admit(self, newcomers, seconds):
            self.sizes.append(newcomers)

    def run(max_batch: int, window: float) -> list[int]:
        obs = Admits()
        s = Scheduler(r, SchedulerConfig(max_batch=max_batch, max_queue=8, admit_window=window), obs).start()
        done = threading.Semaphore(0)
        texts: dict[int, str] = {}

        def submit(i):
            def on_event(ev):
                if ev.kind != "token":
                    texts[i] = ev.text if ev.kind == "done" else repr(ev.error)
                    done.release()
            pv = r.pixel_values([image(i)])
            s.submit(Request(pv, PROMPTS[i % 4], r.encode_prompts([PROMPTS[i % 4]], cfg)[0], cfg, on_event))

        submit(9)  # one admission measured: the budget is known from here on
        assert done.acquire(timeout=60)
        obs.sizes.clear()
        t0 = time.monotonic()
        for i in range(4):
            submit(i)
            time.sleep(0.02)
        for _ in range(4):
            assert done.acquire(timeout=60)
        seconds = time.monotonic() - t0
        s.close()
        for i in range(4):
            assert texts[i] == alone(r, i, PROMPTS[i % 4], max_new_tokens=6).text
        return obs.sizes, seconds

    assert run(8, 0.5)[0] == [4]  # waited until arrivals stopped (a quarter of the window after the last)
    assert len(run(8, 0.0)[0]) > 1  # no window: the first was admitted alone
    # newcomers that fill the free slots do not wait: waiting would take a quarter of the 8 s window (2 s)
    # after the last arrival, or 2 s per request with one slot
    sizes, seconds = run(4, 8.0)
    assert sizes == [4] and seconds < 1.5
    sizes, seconds = run(1, 8.0)
    assert sizes == [1, 1, 1, 1] and seconds < 1.5


def test_close_during_an_admission_finishes_the_newcomers(tiny_bundle):
    """Newcomers whose vision + prefill is running are neither waiting nor in a row yet: they still count as
    running (metrics, /health) and close() waits for them instead of stopping the batch under them."""
    from runtime.serving.scheduler import Request, Scheduler, SchedulerConfig

    r = Blip2Runtime(tiny_bundle)
    cfg = r.generation_config(max_new_tokens=4)
    features = r.image_features
    entered = threading.Event()

    def slow_features(pv):
        entered.set()
        time.sleep(0.5)
        return features(pv)

    r.image_features = slow_features
    s = Scheduler(r, SchedulerConfig(max_batch=4, max_queue=4, admit_window=0)).start()
    got: list = []
    s.submit(Request(r.pixel_values([image(1)]), PROMPTS[1], r.encode_prompts([PROMPTS[1]], cfg)[0], cfg,
                     lambda ev: got.append(ev) if ev.kind != "token" else None))
    assert entered.wait(30)
    assert s.running == 1 and not s.idle()
    s.close(timeout=60)
    assert [e.kind for e in got] == ["done"], got
    assert got[0].text == alone(r, 1, PROMPTS[1], max_new_tokens=4).text
