"""``blip2-export demo``: export, run and check the embedded default model end to end."""

from __future__ import annotations

import time
from pathlib import Path

from blip2_export.export import ExportConfig, export_bundle
from blip2_export.modelzoo import PRESETS, make_random_checkpoint
from blip2_export.parity import list_images, run_parity
from runtime.errors import Blip2Error
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime

ASSETS = Path(__file__).parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"
SAMPLE_IMAGES = ASSETS / "sample_images"


def sample_images() -> list[Path]:
    if SAMPLE_IMAGES.is_dir():
        files = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if files:
            return files
    return []


def run_demo(out: Path, *, preset: str = "embedded", images: list | None = None, force: bool = False,
             echo=print) -> dict:

    out = Path(out)
    if preset == "embedded":
        if (DEMO_MODEL / "config.json").is_file():
            checkpoint = DEMO_MODEL
            echo(f"model: embedded demo model ({checkpoint})")
        else:
            preset = "tiny"
            echo("model: no trained demo model is installed; using a random 'tiny' BLIP-2")
    if preset != "embedded":
        if preset not in PRESETS:
            raise Blip2Error(f"unknown demo model {preset!r}; choose embedded or one of: {', '.join(PRESETS)}")
        checkpoint = out / f"checkpoint-{preset}"
        if force or not (checkpoint / "config.json").is_file():
            echo(f"model: building a random '{preset}' BLIP-2 at {checkpoint}")
            make_random_checkpoint(checkpoint, preset)
    bundle = out / "bundle"
    reuse = False
    if bundle.exists() and not force:
        try:
            m = load_manifest(bundle)
            reuse = m.source.get("checkpoint") == Path(checkpoint).name
        except Blip2Error:
            reuse = False
    t0 = time.perf_counter()
    if not reuse:
        echo(f"export: {checkpoint} -> {bundle}")
        export_bundle(checkpoint, bundle, ExportConfig(force=True))
        echo(f"export: done in {time.perf_counter() - t0:.1f} s")
    else:
        echo(f"export: reusing {bundle} (pass --force to rebuild)")

    rt = Blip2Runtime(bundle)
    files = list(images or []) or sample_images()
    pics = files or list_images(None, count=4)
    captions = []
    echo("captions:")
    for f in pics:
        t = time.perf_counter()
        text = rt.caption(f)
        name = Path(f).name if isinstance(f, (str, Path)) else getattr(f, "filename", "image")
        echo(f"  {name}: {text!r}  ({(time.perf_counter() - t) * 1000:.0f} ms)")
        captions.append((str(name), text))
    echo("parity (eager transformers vs bundle, greedy, 16 new tokens):")
    rep = run_parity(checkpoint, bundle, images=pics[:4], prompts=("",), max_new_tokens=16)
    for s in rep.stages:
        echo(f"  {s.name:<14} max abs diff {s.max_abs:.2e}  cosine {s.cosine:.7f}")
    echo(f"  generations token-identical: {rep.exact_sequences}/{len(rep.generations)}  -> "
         f"{'PASS' if rep.ok else 'FAIL'}")
    if not rep.ok:
        raise Blip2Error("demo parity check failed")
    return {"bundle": str(bundle), "captions": captions, "parity_ok": rep.ok}
