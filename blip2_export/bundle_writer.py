"""What every family's exporter shares: the export config, one graph's ONNX export, the text side
(embedding table, tokenizer) and the manifest of a bundle being assembled.

The export loop (:mod:`blip2_export.export`) and the family adapters (:mod:`blip2_export.families`)
call these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2_export import __version__
from blip2_export.graphs import example_inputs
from blip2_export.modelzoo import checkpoint_identity
from blip2_export.weights import ModuleWeights, export_onnx_streaming
from runtime.contract import GraphIO, GraphName
from runtime.errors import Blip2Error
from runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    GenerationDefaults,
    GraphRecord,
    Manifest,
    ModelFacts,
    Preprocess,
    file_record,
)

# Above this size a graph's weights go to one external data file beside it (written one tensor at a time;
# below it the graph holds them, built in memory).
DEFAULT_EXTERNAL_DATA_THRESHOLD = 64 << 20


@dataclass(frozen=True)
class ExportConfig:
    """What the exported graphs must support. Checked before any export work starts."""

    max_batch: int = 16  # rows through the decoder: images x beams
    max_context: int | None = None  # total positions (visual prefix + prompt + generated); None: model limit
    opset: int = 18
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD
    max_new_tokens: int = 30  # default generation length written to the manifest
    force: bool = False
    ort_engine: bool = True  # also build the ORT engine of the decoder (fused attention, in-place KV cache)

    def validate(self, model_limit: int | None = None, num_query_tokens: int = 0) -> None:
        if self.max_batch < 1:
            raise Blip2Error(f"--max-batch must be >= 1 (got {self.max_batch})")
        if not 14 <= self.opset <= 21:
            raise Blip2Error(f"--opset {self.opset} is not supported; use 14..21 (default 18)")
        if self.max_context is not None:
            if self.max_context <= num_query_tokens + 1:
                raise Blip2Error(f"--max-context {self.max_context} leaves no room for a prompt after the "
                                 f"{num_query_tokens} visual tokens; use at least {num_query_tokens + 8}")
            if model_limit is not None and self.max_context > model_limit:
                raise Blip2Error(f"--max-context {self.max_context} exceeds the model's {model_limit} positions; "
                                 f"use at most {model_limit}")
        if self.external_data_threshold < 0:
            raise Blip2Error("--external-data-threshold must be >= 0")


def preprocess_facts(image_processor, image_size: int) -> Preprocess:
    """The checkpoint's image processor as the runtime replays it (runtime/preprocess.py).

    Every value comes from the processor transformers loaded (preprocessor_config.json over the class
    defaults); a switch the runtime does not replay (center crop, padding, aspect-keeping sizes) is one
    error naming the field.
    """
    name = "preprocessor_config.json"
    for flag in ("do_center_crop", "do_pad", "do_reduce_labels"):
        if getattr(image_processor, flag, None):
            raise Blip2Error(f"{name}: {flag} is true, which the runtime's preprocessing does not replay",
                             hint=f"set {flag} to false (BLIP-2 processors resize to a square)")
    size = image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    h, w = get("height", None), get("width", None)
    if h is None or w is None:
        shown = {k: v for k, v in (size.items() if isinstance(size, dict) else vars(size).items()) if v}
        raise Blip2Error(f"{name}: size {shown} is not a fixed height and width",
                         hint=f'set "size": {{"height": {image_size}, "width": {image_size}}}')
    if (int(h), int(w)) != (image_size, image_size):
        raise Blip2Error(f"{name}: size {h}x{w} differs from vision_config.image_size {image_size}",
                         hint=f'set "size": {{"height": {image_size}, "width": {image_size}}}')
    names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
    resample = getattr(image_processor, "resample", None)
    resample = 2 if resample is None else resample  # transformers resizes with BILINEAR when unset
    try:
        resample_name = names[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise Blip2Error(f"{name}: resample {resample!r} is not a PIL filter (0..5)") from None
    mean, std = image_processor.image_mean, image_processor.image_std
    mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
    std = [std] * 3 if isinstance(std, (int, float)) else list(std)
    if len(mean) != 3 or len(std) != 3:
        raise Blip2Error(f"{name}: image_mean and image_std need 3 values (RGB), got {mean} and {std}")
    return Preprocess(
        height=int(h), width=int(w), resample=resample_name,
        rescale_factor=float(image_processor.rescale_factor),
        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
        convert_rgb=bool(getattr(image_processor, "do_convert_rgb", True)),
        do_resize=bool(getattr(image_processor, "do_resize", True)),
        do_rescale=bool(getattr(image_processor, "do_rescale", True)),
        do_normalize=bool(getattr(image_processor, "do_normalize", True)),
    )


def export_onnx(module, args: tuple, io: GraphIO, path: Path, opset: int, external_threshold: int,
                weights=None) -> list[str]:
    """Export ``module`` with the names and dynamic axes declared by ``io``; return external data files.

    Uses the TorchScript exporter, which is fast on these graphs and reaches ~1e-7 parity. Weights are
    streamed (:func:`blip2_export.weights.export_onnx_streaming`) from ``weights`` (a
    :class:`~blip2_export.weights.CheckpointWeights` for a lazily loaded model; the module's own tensors
    when None), so no graph's weights are ever held twice. The module is put in eval mode first: that
    exporter would otherwise keep training-mode dropout.
    """

    return export_onnx_streaming(module, args, io, path, opset, external_threshold, weights or ModuleWeights())


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="graph")


def write_manifest(tmp: Path, *, checkpoint, facts: ModelFacts, image_processor, dims: dict,
                   graphs: dict[str, GraphRecord], files: dict, config: ExportConfig,
                   generation: GenerationDefaults) -> Manifest:
    """Validate and write the fp32 manifest of a bundle being assembled in ``tmp`` (every family)."""
    import torch
    import transformers


    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model=facts,
        preprocess=preprocess_facts(image_processor, facts.image_size),
        generation=generation,
        dims=dims,
        graphs={"fp32": graphs},
        files=files,
        source=source_identity(checkpoint, checkpoint_identity),
        versions={"blip2_export": __version__, "torch": torch.__version__,
                  "transformers": transformers.__version__, "onnx": onnx_version(), "opset": str(config.opset)},
    )
    manifest.validate()
    (tmp / MANIFEST_NAME).write_text(manifest.dumps())
    return manifest


def export_graph(tmp: Path, name: GraphName, module, io: GraphIO, sizes: dict, config: ExportConfig,
                 weights=None) -> GraphRecord:

    file = f"{name.value}.onnx"
    ext = export_onnx(module, example_inputs(io, sizes), io, tmp / file, config.opset,
                      config.external_data_threshold, weights)
    rec = file_record(tmp, file)
    return GraphRecord(name=name.value, file=file, sha256=rec.sha256, io=io, precision="fp32",
                       external_data=tuple(file_record(tmp, e) for e in ext))


def write_text_side(tmp: Path, model, tokenizer, weights=None) -> dict:
    """Token embedding table (the "prompt table") and tokenizer files; returns their file records.

    ``weights``: where the table's values come from (see :func:`export_onnx`)."""

    emb = (weights or ModuleWeights()).array(model.get_input_embeddings().weight)
    np.save(tmp / "embed_tokens.npy", np.ascontiguousarray(emb), allow_pickle=False)
    tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    special = {
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
    return {
        "embed_tokens": file_record(tmp, "embed_tokens.npy"),
        "tokenizer": file_record(tmp, "tokenizer.json"),
        "tokenizer_config": file_record(tmp, "tokenizer_config.json"),
    }


def source_identity(checkpoint, identity) -> dict:
    if checkpoint is None:
        return {"checkpoint": None}
    p = Path(checkpoint)
    return {"checkpoint": p.name, "weights_sha256": identity(p) if p.is_dir() else None}


def onnx_version() -> str:
    import onnx

    return onnx.__version__
