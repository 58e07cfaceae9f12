"""The loop: atomic checkpoints, kill + --resume latest, and DDP (2 processes) == 1 process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import train as loop
from trainer.data import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["vision_hidden=32", "vision_layers=1", "vision_heads=2", "vision_ffn=32", "qformer_hidden=32",
         "qformer_layers=2", "qformer_heads=2", "qformer_ffn=32", "image_size=32", "num_query_tokens=8"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "d", {"train": 64, "val": 0, "test": 0},
                            image_size=32)


def _cmd(data, out, steps, batch=8, extra=()):
    args = ["stage1", "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch),
            "--precision", "fp32", "--no-progress", "--warmup", "3", "--lr", "2e-3", "--seed", "3"]
    for s in SIZES:
        args += ["--size", s]
    return [*args, *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240, check=False, **kw)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model" / "model.safetensors"))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume_latest_gives_the_same_final_weights(tiny_data, tmp_path):
    steps = 150
    ref = _run(_cmd(tiny_data, tmp_path / "ref", steps, extra=["--ckpt-every", "10"]))
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *_cmd(tiny_data, out, steps, extra=["--ckpt-every", "10"])],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill between checkpoints, a few steps after step 20
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 25:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 25 <= killed_at < steps, "the run finished before it could be killed"
    assert not (out / "model").exists()
    assert not list((out / "checkpoints").glob(".*tmp"))
    saved_step = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert saved_step % 10 == 0 and saved_step < killed_at

    res = _run(_cmd(tiny_data, out, steps, extra=["--ckpt-every", "10", "--resume", "latest"]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "ref") == _losses(out)  # the same curve, no duplicated steps


def test_two_process_ddp_matches_one_process(tiny_data, tmp_path):
    steps = 6
    one = _run(_cmd(tiny_data, tmp_path / "one", steps, batch=8))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "trainer.cli", *_cmd(tiny_data, tmp_path / "two", steps, batch=8)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world"] == 2
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == steps
    assert l1[-1] < l1[0]  # it learns
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (l1, l2)
    # Adam's first steps move weights by ~lr whatever the gradient size, so float-noise gradients
    # (reduction order) can differ by a few lr; anything larger would be a real DDP bug
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() <= 5 * 2e-3, k


class _Boom(Exception):
    pass


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "checkpoints" / "latest.pt"
    loop.save_checkpoint(path, model, opt, sched, 5, {"a": 1})
    before = path.read_bytes()

    def torn_save(obj, f, *a, **k):  # a crash half-way through writing the new checkpoint
        f.write(b"partial")
        raise _Boom()

    monkeypatch.setattr(loop.torch, "save", torn_save)
    with pytest.raises(_Boom):
        loop.save_checkpoint(path, model, opt, sched, 6, {"a": 1})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 5 and set(state) == {"model", "optimizer", "scheduler", "step", "config"}


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    assert loop.resolve_resume("latest", tmp_path) is None
    from runtime.errors import Blip2Error

    with pytest.raises(Blip2Error, match="no such checkpoint"):
        loop.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_lr_schedule_warms_up_then_decays():
    cfg = loop.LoopConfig(out="x", steps=100, warmup=10, min_lr_ratio=0.1)
    f = loop.lr_lambda(cfg)
    assert f(0) < f(5) < f(9) == 1.0
    assert f(10) == pytest.approx(1.0) and f(55) < 1.0 and f(100) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = loop.param_groups(m, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_data_order_is_a_permutation_per_epoch():
    order = loop.DataOrder(10, seed=1)
    first = order(torch.arange(0, 10))
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(order(torch.arange(3, 7)), first[3:7])
    assert not torch.equal(order(torch.arange(10, 20)), first)
