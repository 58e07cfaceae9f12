"""Reliability 2: SIGKILL at random points never leaves a torn bundle, engine build or checkpoint.

A runner process imports the heavy modules once, then forks one child per trial. Each child runs the
real command (``blip2-export export --force``, ``blip2-export build``) with every file-system step it
takes counted (``open`` for writing, ``os.replace``/``rename``/``fsync``/``mkdir``/``unlink``,
``shutil.rmtree``, the atomic folder exchange) and SIGKILLs itself just before step N, N drawn at
random (seeded) over the whole run; other trials kill it after a random delay instead, which lands
inside long C calls (the ONNX export, the graph transforms). Afterwards the test checks what is on
disk: the previous complete bundle or the new complete one, every checksum verified, runnable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from runtime.integrity import sha256_file
from runtime.manifest import MANIFEST_NAME, load_manifest
from runtime.pipeline import Blip2Runtime

IMG = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)

RUNNER = textwrap.dedent(r'''
    import builtins, io, json, os, random, shutil, signal, sys, threading, time, traceback
    spec = json.loads(sys.argv[1])
    EV = {"n": 0, "kill_at": None, "fd": None}

    def event(name):
        EV["n"] += 1
        if EV["kill_at"] is not None and EV["n"] >= EV["kill_at"]:
            os.write(EV["fd"], name.encode())
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(mod, attr, label, when=None):
        real = getattr(mod, attr)
        def wrapper(*a, **k):
            if when is None or when(a, k):
                event(label)
            return real(*a, **k)
        setattr(mod, attr, wrapper)

    def writing(a, k):
        mode = a[1] if len(a) > 1 else k.get("mode", "r")
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    for name in ("replace", "rename", "fsync", "mkdir", "unlink", "rmdir"):
        hook(os, name, "os." + name)
    hook(shutil, "rmtree", "shutil.rmtree")
    hook(builtins, "open", "open-for-write", writing)
    io.open = builtins.open
    import runtime.integrity
    hook(runtime.integrity, "exchange_paths", "exchange_paths")
    exec(spec["prepare"])  # heavy imports, once, before any fork

    def run_trial(trial):
        exec(spec["command"], {"trial": trial, "spec": spec})

    rng = random.Random(spec["seed"])
    results, total, duration = [], None, None
    for i, trial in enumerate(spec["trials"]):
        if i > 0 and total is not None:
            if trial.get("delay") == "random":
                trial["delay"] = rng.uniform(0.0, duration)
            elif isinstance(trial.get("kill_at"), int) and trial["kill_at"] < 0:
                trial["kill_at"] = total + 1 + trial["kill_at"]  # -1: just before the last step
            elif trial.get("kill_at") == "random":
                # stratified: trial j of k lands in the j-th slice of the run's steps
                k, j = spec["kill_trials"], trial["slot"]
                lo, hi = 1 + (total * j) // k, max(1 + (total * j) // k, (total * (j + 1)) // k)
                trial["kill_at"] = rng.randint(lo, hi)
        r, w = os.pipe()
        start = time.time()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            EV.update(n=0, kill_at=trial.get("kill_at"), fd=w)
            if trial.get("delay") is not None:
                threading.Timer(trial["delay"], lambda: (os.write(w, b"timer"), os.kill(os.getpid(), signal.SIGKILL))).start()
            code = 3
            try:
                code = run_trial(trial) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            os.write(w, ("|count=%d" % EV["n"]).encode())
            os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        note = b""
        while chunk := os.read(r, 4096):
            note += chunk
        os.close(r)
        note = note.decode()
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        res = {**trial, "killed": killed, "exit": None if killed else os.WEXITSTATUS(status),
               "at": note.split("|")[0] if killed else None, "seconds": round(time.time() - start, 3)}
        if spec.get("resume_command") and i > 0:  # then run to the end from what the kill left
            pid = os.fork()
            if pid == 0:
                EV.update(n=0, kill_at=None)
                code = 3
                try:
                    exec(spec["resume_command"], {"trial": trial, "spec": spec})
                    code = 0
                except BaseException:
                    traceback.print_exc()
                os._exit(code)
            _, rstatus = os.waitpid(pid, 0)
            res["resume_exit"] = os.WEXITSTATUS(rstatus) if os.WIFEXITED(rstatus) else -os.WTERMSIG(rstatus)
        if i == 0:
            total = int(note.split("count=")[1])
            duration = time.time() - start
            res["events"] = total
        results.append(res)
    print("RESULTS " + json.dumps(results))
''')


def run_trials(prepare: str, command: str, trials: list[dict], seed: int, timeout: int = 300,
               resume_command: str | None = None, **extra) -> list[dict]:
    """Run ``command`` once without a kill (trial 0, counts the steps), then once per kill trial (and
    after each, ``resume_command`` to the end, when given)."""
    spec = {"prepare": prepare, "command": command, "trials": trials, "seed": seed,
            "kill_trials": sum(1 for t in trials if t.get("kill_at") == "random"),
            "resume_command": resume_command, **extra}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=timeout, check=False, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert results[0]["exit"] == 0 and results[0]["events"] > 5, (results[0], r.stderr[-3000:])
    return results


def _trials(n_kill: int, n_delay: int, tail: int = 0, **common) -> list[dict]:
    """The counting run, ``n_kill`` kills at random steps (one per slice of the run), ``n_delay`` kills
    after a random time, and kills before each of the last ``tail`` steps (the commit and clean-up)."""
    return ([{"kill_at": None, **common}]
            + [{"kill_at": "random", "slot": j, **common} for j in range(n_kill)]
            + [{"delay": "random", **common} for _ in range(n_delay)]
            + [{"kill_at": -k, **common} for k in range(1, tail + 1)])


def _hidden_leftovers_only(folder: Path, keep: str) -> None:
    for p in folder.iterdir():
        assert p.name == keep or p.name.startswith("."), f"crash left a visible {p.name} next to the bundle"


def _describe(results: list[dict]) -> str:
    return ", ".join(f"{'kill@' + str(r['kill_at']) if r.get('kill_at') else 'delay ' + str(r.get('delay'))[:5]}"
                     f"->{r['at'] or 'finished'}" for r in results[1:])


# -------------------------------------------------------------------------------------------- export
EXPORT_PREPARE = "import torch, transformers, onnx\nfrom blip2_export.cli import main\nimport blip2_export.export"
EXPORT_COMMAND = ("from blip2_export.cli import main\n"
                  "raise SystemExit(main(['export', spec['checkpoint'], '-o', trial['out'], '--force', "
                  "'--max-context', '96']))")


def test_killed_export_leaves_the_old_or_the_new_bundle(tiny_checkpoint, tiny_bundle, tmp_path):
    """``export --force`` over an existing bundle, killed anywhere: OUT is the old bundle (max_context 128)
    or the new one (96), complete and verified; never missing, never a mix. A fresh export (no old
    bundle) killed anywhere leaves no OUT or the complete new one. Leftovers are hidden temp folders."""
    trials = _trials(6, 1, tail=1)
    fresh_slots = {1, 4}
    for i, t in enumerate(trials):
        d = tmp_path / f"trial-{i}"
        d.mkdir()
        t["fresh"] = t.get("slot") in fresh_slots
        if not t["fresh"]:
            shutil.copytree(tiny_bundle, d / "bundle")
        t["out"] = str(d / "bundle")
    cmd = EXPORT_COMMAND.replace("spec['checkpoint']", repr(str(tiny_checkpoint)))
    results = run_trials(EXPORT_PREPARE, cmd, trials, seed=7)
    old_manifest = (tiny_bundle / MANIFEST_NAME).read_bytes()
    outcomes = []
    for res in results:
        out = Path(res["out"])
        _hidden_leftovers_only(out.parent, "bundle")
        if res["fresh"] and not out.exists():
            outcomes.append("none")
            continue
        assert out.is_dir(), f"no bundle at all after a kill at {res['at']}"
        m = load_manifest(out)  # checksums of every file
        assert m.model.max_context in (128, 96), m.model.max_context
        if m.model.max_context == 128:
            assert not res["fresh"] and (out / MANIFEST_NAME).read_bytes() == old_manifest
        outcomes.append("new" if m.model.max_context == 96 else "old")
        assert Blip2Runtime(out).generate([IMG], "a photo of", max_new_tokens=2)[0].token_ids
        if not res["killed"]:
            assert res["exit"] == 0 and outcomes[-1] == "new"
    print(f"\nexport --force killed at: {_describe(results)}; bundles left: {outcomes[1:]} "
          f"(of {results[0]['events']} file-system steps; fresh exports: slots {sorted(fresh_slots)})")
    assert sum(r["killed"] for r in results) >= 6
    assert "old" in outcomes and "new" in outcomes[1:], "the kill points did not cover both sides of the swap"


# --------------------------------------------------------------------------------------------- build
BUILD_PREPARE = "import onnx\nimport engines.build, engines.fp16, engines.int8\nfrom blip2_export.cli import main"
BUILD_COMMAND = ("from blip2_export.cli import main\n"
                 "raise SystemExit(main(['build', trial['out'], '--precision', 'fp16', '--backend', 'ort']))")


def test_killed_build_leaves_the_old_or_the_new_manifest(tiny_bundle, tmp_path):
    """``build --precision fp16`` killed anywhere: the manifest is the fp32-only one with every file
    intact, or the new one with fp16 graphs that verify and run."""
    trials = _trials(7, 2, tail=3)
    for i, t in enumerate(trials):
        shutil.copytree(tiny_bundle, tmp_path / f"trial-{i}")
        t["out"] = str(tmp_path / f"trial-{i}")
    results = run_trials(BUILD_PREPARE, BUILD_COMMAND, trials, seed=3)
    old_manifest = (tiny_bundle / MANIFEST_NAME).read_bytes()
    outcomes = []
    for res in results:
        out = Path(res["out"])
        m = load_manifest(out)
        if m.precisions() == ["fp32"]:
            assert (out / MANIFEST_NAME).read_bytes() == old_manifest
            outcomes.append("old")
        else:
            assert m.precisions() == ["fp32", "fp16"], m.precisions()
            outcomes.append("new")
            assert Blip2Runtime(out, precision="fp16").generate([IMG], "a photo of", max_new_tokens=2)
        for name in ("vision.onnx", "qformer.onnx", "decoder.onnx", "embed_tokens.npy"):
            assert sha256_file(out / name) == sha256_file(tiny_bundle / name)  # fp32 files never touched
    print(f"\nbuild fp16 killed at: {_describe(results)}; manifests left: {outcomes[1:]} "
          f"(of {results[0]['events']} file-system steps)")
    assert "old" in outcomes[1:] and "new" in outcomes, outcomes


# ------------------------------------------------------------------------------ the primitives themselves
PRIMITIVE_COMMAND = '''
from pathlib import Path
from runtime.integrity import atomic_directory, atomic_write_text
root = Path(trial["out"])
with atomic_directory(root / "folder", force=True) as tmp:
    for i in range(5):
        (tmp / f"f{i}.txt").write_text("new %d" % i)
atomic_write_text(root / "file.txt", "new")
'''


def test_atomic_directory_and_file_under_every_kill_point(tmp_path):
    """Kill before each file-system step of atomic_directory(force=True) + atomic_write_text: the folder
    is the old one (5 old files) or the new one (5 new files), the file is "old" or "new"."""
    n_steps = 40  # more than the steps these two calls take: later points let the run finish
    trials = [{"kill_at": None}] + [{"kill_at": k} for k in range(1, n_steps)]
    for i, t in enumerate(trials):
        root = tmp_path / f"t{i}"
        (root / "folder").mkdir(parents=True)
        for j in range(5):
            (root / "folder" / f"f{j}.txt").write_text(f"old {j}")
        (root / "file.txt").write_text("old")
        t["out"] = str(root)
    results = run_trials("", PRIMITIVE_COMMAND, trials, seed=0, timeout=120)
    states = set()
    for res in results:
        root = Path(res["out"])
        files = sorted(p.name for p in (root / "folder").iterdir())
        assert files == [f"f{j}.txt" for j in range(5)], (res, files)
        texts = {(root / "folder" / f).read_text().split()[0] for f in files}
        assert texts in ({"old"}, {"new"}), (res, texts)
        assert (root / "file.txt").read_text() in ("old", "new")
        states.add((texts.pop(), (root / "file.txt").read_text()))
        assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == {"folder", "file.txt"}
    assert states == {("old", "old"), ("new", "old"), ("new", "new")}, states


def test_killed_forced_rebuild_keeps_a_complete_bundle(tiny_bundle, tmp_path):
    """``build --precision int8 --force`` with new calibration images over an int8 build, killed during
    its commit: the bundle must still verify (old int8 graphs or new ones)."""
    from PIL import Image

    from blip2_export.cli import main

    for name, seed in (("calib-a", 0), ("calib-b", 1)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.random.default_rng(seed * 10 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                            ).save(tmp_path / name / f"{i}.png")
    base = tmp_path / "base"
    shutil.copytree(tiny_bundle, base)
    assert main(["build", str(base), "--precision", "int8", "--backend", "ort",
                 "--calib-images", str(tmp_path / "calib-a")]) == 0
    trials = _trials(0, 0, tail=10)
    for i, t in enumerate(trials):
        shutil.copytree(base, tmp_path / f"trial-{i}")
        t["out"] = str(tmp_path / f"trial-{i}")
    cmd = ("from blip2_export.cli import main\n"
           "raise SystemExit(main(['build', trial['out'], '--precision', 'int8', '--backend', 'ort', '--force', "
           f"'--calib-images', {str(tmp_path / 'calib-b')!r}]))")
    for res in run_trials(BUILD_PREPARE, cmd, trials, seed=5):
        load_manifest(res["out"])


# -------------------------------------------------------------------------------------------- training
TRAIN_PREPARE = ("import torch\nimport trainer.train, trainer.tasks, trainer.models\n"
                 "from blip2_export.modelzoo import ModelSpec")
TRAIN_COMMAND = """
from blip2_export.modelzoo import ModelSpec
from trainer.tasks import Stage1Task
from trainer.train import LoopConfig, train
task = Stage1Task(spec["data"], ModelSpec(), eval_limit=0)
train(task, LoopConfig(out=trial["out"], steps=6, batch_size=8, ckpt_every=2, warmup=1, progress=False,
                       resume="latest", seed=0))
"""
TRAIN_RESUME = """
import json, os, torch
from pathlib import Path
out = Path(trial["out"])
ckpt = out / "checkpoints" / "latest.pt"
seen = {"ckpt_step": None, "error": None, "files": sorted(os.listdir(out / "checkpoints"))
        if (out / "checkpoints").is_dir() else []}
if ckpt.exists():
    try:
        seen["ckpt_step"] = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    except Exception as e:
        seen["error"] = f"{type(e).__name__}: {e}"
(out.parent / "after-kill.json").write_text(json.dumps(seen))
""" + TRAIN_COMMAND


def test_killed_training_resumes_from_a_complete_checkpoint(tmp_path):
    """Stage-1 training (6 steps, a checkpoint every 2) killed anywhere: ``checkpoints/latest.pt`` is
    absent or a complete checkpoint of step 2, 4 or 6; ``resume="latest"`` then finishes the run with
    the same per-step losses as the uninterrupted run and one metrics line per step.

    Uses ``trainer.train.train`` (what ``blip2-train ... --resume latest`` runs); the CLI itself was not
    there yet when this test was written."""
    from trainer.data import generate_dataset

    data = generate_dataset(tmp_path / "data", {"train": 64, "val": 8, "test": 8}, image_size=32)
    trials = _trials(3, 1)
    for i, t in enumerate(trials):
        (tmp_path / f"trial-{i}").mkdir()
        t["out"] = str(tmp_path / f"trial-{i}" / "run")
    results = run_trials(TRAIN_PREPARE, TRAIN_COMMAND, trials, seed=13, resume_command=TRAIN_RESUME,
                         data=str(data))

    def losses(out: Path) -> list[tuple[int, float]]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(ln)["step"], json.loads(ln)["loss"]) for ln in lines]

    reference = losses(Path(results[0]["out"]))
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    left = []
    for res in results[1:]:
        out = Path(res["out"])
        seen = json.loads((out.parent / "after-kill.json").read_text())
        assert seen["error"] is None, seen
        assert seen["ckpt_step"] in (None, 2, 4, 6), seen
        assert all(f == "latest.pt" or f.startswith(".") for f in seen["files"]), seen
        left.append(seen["ckpt_step"])
        assert res["resume_exit"] == 0, res
        got = losses(out)
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6], got
        assert np.allclose([v for _, v in got], [v for _, v in reference], rtol=0, atol=1e-4), (got, reference)
        final = __import__("torch").load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
        assert final["step"] == 6
        assert (out / "model").is_dir()
    print(f"\ntraining killed at: {_describe(results)}; checkpoint step left: {left}; all resumed to step 6 "
          f"with the uninterrupted losses (of {results[0]['events']} file-system steps)")
    assert any(s in (2, 4) for s in left), "no kill landed after a mid-run checkpoint: resume was not exercised"


def test_atomic_write_keeps_permissions_and_shares_new_files(tmp_path):
    """mkstemp makes private files; a rewritten manifest must stay readable to the other users of a bundle."""
    from runtime.integrity import atomic_write_text

    fresh, kept = tmp_path / "manifest.json", tmp_path / "private.json"
    atomic_write_text(fresh, "{}")
    assert fresh.stat().st_mode & 0o777 == 0o644
    kept.write_text("old")
    kept.chmod(0o600)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o600
