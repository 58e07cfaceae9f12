"""Load test of `blip2-export serve`: continuous batching against one request at a time, side by side.

    PYTHONPATH=. python scripts/load_test.py --model demo --model bench

For each model it exports a bundle (cached under --work), computes every expected answer with
``Blip2Runtime.generate`` alone, then starts two servers on 127.0.0.1, one after the other: continuous
batching (``--max-batch 16``) and one request at a time (``--max-batch 1``). Each is driven by 1/4/8/16
closed-loop clients (each sends its next request when its answer arrives; greedy, ``max_tokens`` fixed),
and the table gives requests/s, p50/p99 latency and the throughput ratio at each client count.

Every answer is checked: a request that got no answer (lost), an answer whose text is not the one
``generate`` gives that request alone (wrong), and the server's count of completed requests against the
clients' count of answers (a difference means an answer was lost or sent twice). Two more runs on the batching
server count the same things when streaming clients hang up mid-stream and when the server gets SIGTERM
mid-load (requests refused after it are counted as refused, not lost).

Loopback only, bounded: ``--requests`` per client count and mode; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["", "Question: what is in the picture? Answer:"]


DONE = 'blip2_requests_total{status="done"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(model: str, work: Path) -> Path:
    """A bundle of the demo model or of the ``bench`` preset (random weights), exported once."""
    out = work / f"{model}-bundle"
    if (out / "manifest.json").exists():
        return out
    from blip2_export.export import ExportConfig, export_bundle

    if model == "demo":
        ckpt = ROOT / "blip2_export" / "assets" / "demo_model"
    else:
        from blip2_export.modelzoo import make_random_checkpoint

        ckpt = make_random_checkpoint(work / f"{model}-ckpt", model, seed=0)
    print(f"exporting {model} -> {out}", flush=True)
    # the demo model has 64 positions; the random presets' KV slots are kept at 128 (memory of 16 slots)
    export_bundle(ckpt, out, ExportConfig(max_context=None if model == "demo" else 128, max_batch=16),
                  progress=False)
    return out


def sample_images() -> list[bytes]:
    folder = ROOT / "blip2_export" / "assets" / "sample_images"
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))]


@dataclass
class Job:
    image: int
    prompt: int
    body: bytes
    expected: str


def make_jobs(bundle: Path, images: list[bytes], max_tokens: int, model_name: str) -> list[Job]:
    from runtime.pipeline import Blip2Runtime

    rt = Blip2Runtime(bundle)
    jobs = []
    for i, raw in enumerate(images):
        url = "data:image/png;base64," + base64.b64encode(raw).decode()
        for j, prompt in enumerate(PROMPTS):
            want = rt.generate([raw], [prompt], max_new_tokens=max_tokens)[0].text
            content = [{"type": "image_url", "image_url": {"url": url}}]
            if prompt:
                content.insert(0, {"type": "text", "text": prompt})
            body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": content}],
                               "max_tokens": max_tokens, "temperature": 0}).encode()
            jobs.append(Job(i, j, body, want))
    return jobs


class Server:
    def __init__(self, bundle: Path, max_batch: int, max_queue: int, threads: int | None, extra: tuple[str, ...] = ()):
        self.port = free_port()
        cmd = [sys.executable, "-m", "blip2_export.cli", "serve", str(bundle), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--model-name", "m", "--timeout", "300"]
        if threads:
            cmd += ["--threads", str(threads)]
        cmd += list(extra)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("server did not start")

    def get(self, path: str) -> tuple[int, str]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def metric(self, name: str) -> float:
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    wrong: int = 0  # answers whose text is not what generate gives that request alone
    conn_errors: int = 0  # connection refused, or closed without an answer
    http_errors: int = 0  # answers other than 200 and 503
    refused: int = 0  # 503: the server is stopping
    cancelled: int = 0  # clients that hung up on purpose
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(conn: http.client.HTTPConnection, job: Job, tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=job.body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    except (OSError, http.client.HTTPException):  # refused, or the connection closed without an answer
        with tally.lock:
            tally.conn_errors += 1
        raise
    dt = time.perf_counter() - t0
    with tally.lock:
        if r.status == 503:
            tally.refused += 1
            return
        if r.status != 200:
            tally.http_errors += 1
            return
        text = json.loads(data)["choices"][0]["message"]["content"]
        tally.ok += 1
        tally.wrong += text != job.expected
        tally.latencies.append(dt)


def drive(port: int, jobs: list[Job], clients: int, total: int, tally: Tally, stop_after: float | None = None):
    """``clients`` threads share ``total`` requests, each sending its next when its answer arrives."""
    counter = iter(range(total))
    lock = threading.Lock()

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            try:
                one_request(conn, jobs[(n * 7 + k) % len(jobs)], tally)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def batch_stats(srv: Server) -> tuple[float, float, float, float]:
    """(admissions, newcomers admitted, decode steps, rows stepped) so far, from the server's metrics."""
    return (srv.metric("blip2_admit_batch_size_count"), srv.metric("blip2_admit_batch_size_sum"),
            srv.metric("blip2_batch_size_count"), srv.metric("blip2_batch_size_sum"))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def load(bundle: Path, jobs: list[Job], levels: list[int], requests: int, threads: int | None,
         rounds: int) -> dict:
    """Both servers run at once (an idle one uses no CPU); at each client count the two are driven in
    alternating rounds (A B B A ...), so a change in the machine's load hits both alike."""
    modes = {"batching": 16, "one-at-a-time": 1}
    servers = {m: Server(bundle, b, max_queue=64, threads=threads) for m, b in modes.items()}
    results: dict = {}
    try:
        for srv in servers.values():
            drive(srv.port, jobs, 2, len(jobs), Tally())  # warm-up (not counted)
        for c in levels:
            acc = {m: {"tally": Tally(), "wall": 0.0, "sent": 0, "done0": servers[m].metric(DONE)} for m in modes}
            batch0 = batch_stats(servers["batching"])
            n_rounds = max(1, min(rounds, requests // c))  # a round keeps every client busy
            for r in range(n_rounds):
                order = list(modes) if r % 2 == 0 else list(reversed(modes))
                for m in order:
                    n = requests // n_rounds + (1 if r < requests % n_rounds else 0)
                    acc[m]["wall"] += drive(servers[m].port, jobs, c, n, acc[m]["tally"])
                    acc[m]["sent"] += n
            for m in modes:
                t, wall = acc[m]["tally"], acc[m]["wall"]
                results[(m, c)] = {
                    "rps": t.ok / wall, "p50": pct(t.latencies, 50), "p99": pct(t.latencies, 99), "ok": t.ok,
                    "sent": acc[m]["sent"], "wrong": t.wrong, "lost": t.conn_errors + t.http_errors + t.refused,
                    "server_done": int(servers[m].metric(DONE) - acc[m]["done0"]),
                }
                if m == "batching":  # how well the batch filled at this client count
                    (a0, n0, s0, r0), (a1, n1, s1, r1) = batch0, batch_stats(servers[m])
                    results[(m, c)].update(admit_batch=(n1 - n0) / max(a1 - a0, 1), step_rows=(r1 - r0) / max(s1 - s0, 1))
                x = results[(m, c)]
                print(f"  {m:14s} {c:2d} clients: {x['rps']:7.2f} req/s  p50 {x['p50'] * 1000:7.1f} ms  "
                      f"p99 {x['p99'] * 1000:7.1f} ms  answers {x['ok']}/{x['sent']}  wrong {x['wrong']}  "
                      f"lost {x['lost']}  server completed {x['server_done']}  load average {os.getloadavg()[0]:.1f}"
                      + (f"  newcomers/admission {x['admit_batch']:.2f}  rows/step {x['step_rows']:.2f}"
                         if "admit_batch" in x else ""), flush=True)
        # batching shares decode steps; vision + Q-Former + prefill cost about the same per image at any batch
        one = servers["one-at-a-time"]
        admit, decode = one.metric("blip2_admit_seconds_sum"), one.metric("blip2_decode_step_seconds_sum")
        share = decode / max(admit + decode, 1e-9)
        results["decode_share"] = share
        print(f"  one-at-a-time server: decode steps {share:.0%} of its model time, vision + Q-Former + prefill "
              f"{1 - share:.0%} (batching shares the decode steps)", flush=True)

    finally:
        for srv in servers.values():
            srv.stop()
    return results


def disconnects(bundle: Path, jobs: list[Job], clients: int, requests: int, threads: int | None) -> dict:
    """Half the requests stream and hang up after the first content chunk; the others must all be answered."""
    srv = Server(bundle, 16, 64, threads)
    tally = Tally()
    counter = iter(range(requests))
    lock = threading.Lock()

    def client(k: int):
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            job = jobs[(n * 5 + k) % len(jobs)]
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
            try:
                if n % 2:
                    body = json.loads(job.body)
                    body["stream"] = True
                    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    while b"content" not in r.readline():
                        pass
                    with tally.lock:
                        tally.cancelled += 1
                else:
                    one_request(conn, job, tally)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic() + 30
    while time.monotonic() < end and srv.metric("blip2_running_requests") + srv.metric("blip2_queue_depth") > 0:
        time.sleep(0.1)
    out = {"answered": tally.ok, "wrong": tally.wrong, "lost": tally.conn_errors + tally.http_errors,
           "hung_up": tally.cancelled,
           "server_done": int(srv.metric(DONE)),
           "server_cancelled": int(srv.metric("blip2_requests_total{status=\"cancelled\"}")),
           "server_disconnects": int(srv.metric("blip2_client_disconnects_total"))}
    # a hang-up is cancelled, or completed if its last token came first: nothing else may be left over
    out["unaccounted"] = out["answered"] + out["hung_up"] - out["server_done"] - out["server_cancelled"]
    srv.stop()
    return out


def sigterm(bundle: Path, jobs: list[Job], clients: int, requests: int, threads: int | None) -> dict:
    """SIGTERM once a third of the requests are answered: requests in flight must still be answered."""
    srv = Server(bundle, 16, 64, threads)
    tally = Tally()
    result: dict = {}

    def killer():
        while tally.ok < requests // 3:
            time.sleep(0.005)
        srv.proc.send_signal(signal.SIGTERM)

    k = threading.Thread(target=killer)
    k.start()
    drive(srv.port, jobs, clients, requests, tally)
    k.join()
    err = srv.stop()
    served = next((json.loads(ln)["served"] for ln in err.splitlines() if ln.startswith('{"served"')), {})
    # every request the server took (submitted) must have been answered once: lost = taken, not answered;
    # after SIGTERM the listening socket closes, so later requests fail to connect (refused, not lost)
    result.update(answered=tally.ok, wrong=tally.wrong, server_took=served.get("submitted"),
                  server_done=served.get("done"), lost=(served.get("submitted") or 0) - tally.ok,
                  refused_after_sigterm=tally.conn_errors + tally.refused, http_errors=tally.http_errors)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=["demo", "bench", "mid", "tiny"], default=None)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=96, help="Requests per client count and mode.")
    ap.add_argument("--rounds", type=int, default=4, help="Alternating rounds the requests are split into.")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="Per request (default: 16 for demo, whose context is 64 positions; 24 for the others).")
    ap.add_argument("--threads", type=int, default=None, help="ORT threads of each server (default: ORT's).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/blip2-load-test"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in a.clients.split(",")]
    images = sample_images()
    report = {}
    for model in a.model or ["demo"]:
        bundle = build_bundle(model, a.work)
        max_tokens = a.max_tokens or (16 if model == "demo" else 24)
        jobs = make_jobs(bundle, images, max_tokens, "m")
        print(f"== {model}: {len(jobs)} distinct requests (6 images x {len(PROMPTS)} prompts), greedy, "
              f"max_tokens {max_tokens}, {a.requests} requests per row; CPU: {os.cpu_count()} cores", flush=True)
        res = load(bundle, jobs, levels, a.requests, a.threads, a.rounds)
        print(f"\nload average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)")
        print(f"| {model} clients | batching req/s | p50 ms | p99 ms | one-at-a-time req/s | p50 ms | p99 ms | "
              "ratio |\n|---|---|---|---|---|---|---|---|")
        for c in levels:
            b, s = res[("batching", c)], res[("one-at-a-time", c)]
            print(f"| {c} | {b['rps']:.2f} | {b['p50'] * 1e3:.0f} | {b['p99'] * 1e3:.0f} | {s['rps']:.2f} | "
                  f"{s['p50'] * 1e3:.0f} | {s['p99'] * 1e3:.0f} | {b['rps'] / s['rps']:.2f}x |")
        rows = [r for k, r in res.items() if isinstance(k, tuple)]
        checks = {
            "load": {"answers": sum(r["ok"] for r in rows), "wrong": sum(r["wrong"] for r in rows),
                     "lost": sum(r["lost"] for r in rows),
                     "server_done_minus_answers": sum(r["server_done"] - r["ok"] for r in rows)},
            "disconnects": disconnects(bundle, jobs, 8, a.requests, a.threads),
            "sigterm": sigterm(bundle, jobs, 8, a.requests, a.threads),
        }
        for k, v in checks.items():
            print(f"{k}: {json.dumps(v)}", flush=True)
        report[model] = {"rows": {f"{k[0]}/{k[1]}": r for k, r in res.items() if isinstance(k, tuple)},
                         "decode_share": res["decode_share"], "checks": checks, "load_average": os.getloadavg()}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
