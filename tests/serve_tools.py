"""Helpers of the serve tests: start a server on loopback, images as data: URLs, a slowed decoder."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image(seed: int, size=(30, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_url(arr_or_bytes, media: str = "image/png") -> str:
    raw = arr_or_bytes if isinstance(arr_or_bytes, bytes) else png_bytes(arr_or_bytes)
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def messages(url: str, prompt: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if prompt is not None:
        parts.insert(0, {"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def metric(base: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample of the server at ``base`` (0 when absent)."""
    _, text = get(f"{base}/metrics")
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


class ServerProcess:
    """``python -m blip2_export.cli serve BUNDLE ...`` (or ``-c code``) on a free loopback port."""

    def __init__(self, args: list[str], env: dict | None = None, code: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if code is not None:
            cmd = [sys.executable, "-c", code, str(self.port), *args]
        else:
            cmd = [sys.executable, "-m", "blip2_export.cli", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if get(f"{self.base}/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not come up in 120 s")

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, **kw)

    def stop(self, timeout: float = 60) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


# A server whose decoder sleeps before every run (so tests can act while requests are running), started
# through runtime.serving.server.run_app: argv = port, bundle, seconds per decoder run, extra ServeConfig JSON.
SLOW_SERVER = """
import json, sys, time
from runtime.backends import RunnerWrapper
from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime
from runtime.serving.server import ServeConfig, run_app

port, bundle, delay, extra = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])

class SlowBinding:
    def __init__(self, b): self.b = b
    def __getattr__(self, k): return getattr(self.b, k)
    def run(self):
        time.sleep(delay)
        return self.b.run()

class SlowGraph(RunnerWrapper):
    def run(self, feeds):
        time.sleep(delay)
        return self.runner.run(feeds)
    def binding(self): return SlowBinding(self.runner.binding())

rt = Blip2Runtime(bundle)
rt.wrap_graph(GraphName.DECODER, SlowGraph)
run_app(rt, ServeConfig(port=port, **extra), echo=lambda m: print(m, file=sys.stderr, flush=True))
"""
