"""The random bench model and its bundle, built once and reused."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from blip2_export.export import ExportConfig, export_bundle
from blip2_export.modelzoo import get_spec, make_random_checkpoint
from blip2_export.text_tokenizer import build_word_tokenizer

BENCH_VOCAB = 50272  # OPT-125M's vocabulary: the bench model's LM head and embedding are OPT-sized

def build_bench_model(model_dir: str | Path, bundle: str | Path, preset: str = "bench", *, max_context: int = 640,
                      max_batch: int = 8, echo: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    """Build a random checkpoint of ``preset`` at ``model_dir`` and its bundle at ``bundle``, unless present.

    The ``bench`` preset gets OPT-125M's vocabulary size (synthetic words) so its embedding and LM head
    weigh what a real small BLIP-2's do. Same preset and seed: same weights, so anyone can reproduce."""

    model_dir, bundle = Path(model_dir), Path(bundle)
    if not (model_dir / "config.json").is_file():
        extra = {}
        if preset == "bench":

            base = len(build_word_tokenizer())  # the word tokenizer's own vocabulary
            extra["extra_words"] = tuple(f"w{i:05d}" for i in range(BENCH_VOCAB - base))
        get_spec(preset, **extra)
        if echo:
            echo(f"building the random '{preset}' checkpoint at {model_dir}")
        tmp = model_dir.with_name(f".{model_dir.name}.tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        make_random_checkpoint(tmp, preset, seed=0, **extra)
        os.replace(tmp, model_dir)
    elif echo:
        echo(f"reusing the checkpoint at {model_dir}")
    if not (bundle / "manifest.json").is_file():
        if echo:
            echo(f"exporting it to {bundle}")
        export_bundle(model_dir, bundle, ExportConfig(max_context=max_context, max_batch=max_batch), progress=True)
    elif echo:
        echo(f"reusing the bundle at {bundle}")
    return model_dir, bundle
