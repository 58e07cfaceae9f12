"""Checkpoint -> bundle: split a BLIP-2 model into graphs, export ONNX, write the manifest.

The bundle is assembled in a hidden temporary folder next to the output and renamed into place
only when every file and the manifest are written, so an interrupted export never leaves a
complete-looking bundle.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import contract
from runtime.contract import Family, GraphIO, GraphName
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory
from runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    DimRange,
    GenerationDefaults,
    GraphRecord,
    Manifest,
    ModelFacts,
    Preprocess,
    file_record,
)

# Above this size a graph's weights go to one external data file beside it (protobuf caps at 2 GiB).
DEFAULT_EXTERNAL_DATA_THRESHOLD = 1 << 30


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


def _first(*values):
    return next((v for v in values if v is not None), None)


def generation_ids(model, tokenizer) -> dict:
    """bos / eos / pad / decoder_start ids as ``Blip2ForConditionalGeneration.generate`` uses them.

    ``generate`` hands over to ``language_model.generate``, whose generation config transformers derives
    from ``text_config``; the checkpoint's own generation_config.json fills what that leaves unset (a
    Flan-T5 whose ``decoder_start_token_id`` lives only there), then the tokenizer's specials. A T5 config
    from transformers' defaults has no ``bos_token_id`` at all: every read tolerates a missing field.
    """
    t = model.config.text_config
    lm = getattr(model.language_model, "generation_config", None)
    top = getattr(model, "generation_config", None)

    def pick(field: str, tokenizer_value=None):
        return _first(getattr(lm, field, None), getattr(top, field, None), getattr(t, field, None),
                      tokenizer_value)

    eos = pick("eos_token_id", tokenizer.eos_token_id)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    bos = pick("bos_token_id", tokenizer.bos_token_id)
    pad = pick("pad_token_id", tokenizer.pad_token_id)
    start = None
    if not model.config.use_decoder_only_language_model:
        start = pick("decoder_start_token_id")
        start = start if start is not None else bos  # generate falls back to bos as transformers does
        if start is None:
            raise Blip2Error("the Flan-T5 checkpoint has no decoder_start_token_id (nor bos_token_id), so "
                             "generate cannot start decoding",
                             hint="set text_config.decoder_start_token_id (0, the pad id, for T5) in config.json")
    if not eos_ids:
        raise Blip2Error("the checkpoint has no eos_token_id (text_config, generation_config.json or the "
                         "tokenizer's eos_token)", hint="set text_config.eos_token_id in config.json")
    return {"bos": None if bos is None else int(bos), "eos": eos_ids, "pad": 0 if pad is None else int(pad),
            "decoder_start": None if start is None else int(start)}


def model_facts(model, tokenizer) -> ModelFacts:
    cfg = model.config
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    decoder_only = cfg.use_decoder_only_language_model
    patches = (v.image_size // v.patch_size) ** 2 + 1
    heads = t.num_attention_heads if decoder_only else t.num_heads
    hidden = t.hidden_size if decoder_only else t.d_model
    head_dim = getattr(t, "head_dim", None) or (hidden // heads if decoder_only else t.d_kv)
    kv_heads = getattr(t, "num_key_value_heads", None) or heads
    limit = getattr(t, "max_position_embeddings", None) or 512
    emb_width = model.get_input_embeddings().weight.shape[1]
    if emb_width != hidden:  # OPT-350m style word_embed_proj_dim: BLIP-2's projection feeds hidden_size
        raise Blip2Error(f"text_config.word_embed_proj_dim {emb_width} differs from hidden_size {hidden}: "
                         "BLIP-2's language_projection writes hidden_size-wide embeddings",
                         hint="a BLIP-2 OPT needs word_embed_proj_dim == hidden_size")
    vocab = model.get_output_embeddings().weight.shape[0]
    image_id = cfg.image_token_index
    if image_id is None or not 0 <= image_id < model.get_input_embeddings().weight.shape[0]:
        raise Blip2Error(f"image_token_index {image_id} is not a row of the {vocab}-token embedding table",
                         hint="set image_token_index in config.json to the tokenizer's <image> id")
    ids = generation_ids(model, tokenizer)
    return ModelFacts(
        family=(Family.DECODER_ONLY if decoder_only else Family.ENCODER_DECODER).value,
        llm_type=t.model_type,
        num_query_tokens=cfg.num_query_tokens,
        image_size=v.image_size,
        patches=patches,
        vision_hidden=v.hidden_size,
        qformer_hidden=q.hidden_size,
        llm_hidden=hidden,
        llm_layers=t.num_hidden_layers if decoder_only else t.num_decoder_layers,
        llm_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=limit,
        bos_token_id=ids["bos"],
        eos_token_ids=ids["eos"],
        pad_token_id=ids["pad"],
        image_token_id=image_id,
        decoder_start_token_id=ids["decoder_start"],
    )


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


def export_onnx(module, args: tuple, io: GraphIO, path: Path, opset: int, external_threshold: int) -> list[str]:
    """Export ``module`` with the names and dynamic axes declared by ``io``; return external data files.

    Uses the TorchScript exporter, which is fast on these graphs and reaches ~1e-7 parity. The module
    is put in eval mode first: that exporter would otherwise keep training-mode dropout.
    """
    import onnx
    import torch

    import tempfile

    module.eval()
    # A private folder: for large graphs torch writes one external file per tensor next to the model.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as work:
        tmp = Path(work) / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(tmp), input_names=io.input_names(), output_names=io.output_names(),
                dynamic_axes=io.dynamic_axes(), opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        proto = onnx.load(str(tmp), load_external_data=True)
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    if weight_bytes > external_threshold:
        data_name = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [data_name]
    onnx.save_model(proto, str(path))
    return []


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="graph")


def export_bundle(checkpoint: str | Path, out: str | Path, config: ExportConfig | None = None, *,
                  progress: bool = True, model_and_tokenizer=None) -> Path:
    """Export ``checkpoint`` (a local transformers BLIP-2 folder) to a bundle at ``out``.

    ``model_and_tokenizer`` may pass an already loaded ``(model, tokenizer, image_processor)``.
    """
    import torch

    from blip2_export.graphs import DecoderGraph, QFormerGraph, VisionGraph
    from blip2_export.modelzoo import load_checkpoint  # noqa: I001

    config = config or ExportConfig()
    out = Path(out)
    if out.exists() and not config.force:
        raise Blip2Error(f"output {out} already exists", hint="pass --force to replace it")
    from blip2_export.modelzoo import RETRIEVAL_ARCHITECTURE, is_retrieval_checkpoint

    if (type(model_and_tokenizer[0]).__name__ == RETRIEVAL_ARCHITECTURE if model_and_tokenizer is not None
            else checkpoint is not None and is_retrieval_checkpoint(checkpoint)):
        from blip2_export.export_retrieval import export_bundle_retrieval  # stage-1 model: ITC / ITM graphs

        return export_bundle_retrieval(checkpoint, out, config, progress=progress,
                                       model_and_tokenizer=model_and_tokenizer)
    if model_and_tokenizer is None:
        model, tokenizer, image_processor = load_checkpoint(checkpoint)
    else:
        model, tokenizer, image_processor = model_and_tokenizer
    facts = model_facts(model, tokenizer)
    config.validate(facts.max_context, facts.num_query_tokens)
    if facts.family != Family.DECODER_ONLY.value:
        from blip2_export import export_seq2seq

        return export_seq2seq.export_bundle_seq2seq(checkpoint, out, config, model, tokenizer, image_processor,
                                                    facts, progress=progress)
    max_ctx = min(config.max_context or facts.max_context, facts.max_context)
    facts = _replace(facts, max_context=max_ctx)
    model = model.float().eval()

    dims = {
        "batch": DimRange(1, 1, config.max_batch),
        "seq": DimRange(1, facts.num_query_tokens + 16, max_ctx),
        "past": DimRange(0, facts.num_query_tokens + 16, max_ctx - 1),
        "total": DimRange(1, facts.num_query_tokens + 32, max_ctx),
    }
    sizes = {"batch": 2, "seq": 5, "past": 3, "total": 8}
    m = facts
    plans: list[tuple[GraphName, torch.nn.Module, GraphIO]] = [
        (GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
        (GraphName.QFORMER, QFormerGraph(model),
         contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden)),
        (GraphName.DECODER, DecoderGraph(model.language_model, m.llm_layers),
         contract.decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size)),
    ]
    with atomic_directory(out, force=config.force) as tmp:
        graphs = {}
        for name, module, io in _progress(plans, progress, "export"):
            graphs[name.value] = _export_one(tmp, name, module, io, sizes, config)
        if config.ort_engine:
            from engines.ort_optimize import attach_ort_engine

            graphs[GraphName.DECODER.value] = attach_ort_engine(tmp, graphs[GraphName.DECODER.value], facts,
                                                                warn=warnings.warn)
        files = write_text_side(tmp, model, tokenizer)
        write_manifest(tmp, checkpoint=checkpoint, facts=facts, image_processor=image_processor, dims=dims,
                       graphs=graphs, files=files, config=config,
                       generation=GenerationDefaults(max_new_tokens=config.max_new_tokens))
    return out


def write_manifest(tmp: Path, *, checkpoint, facts: ModelFacts, image_processor, dims: dict,
                   graphs: dict[str, GraphRecord], files: dict, config: ExportConfig,
                   generation: GenerationDefaults) -> Manifest:
    """Validate and write the fp32 manifest of a bundle being assembled in ``tmp`` (every family)."""
    import torch
    import transformers

    from blip2_export import __version__
    from blip2_export.modelzoo import checkpoint_identity

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model=facts,
        preprocess=preprocess_facts(image_processor, facts.image_size),
        generation=generation,
        dims=dims,
        graphs={"fp32": graphs},
        files=files,
        source=_source(checkpoint, checkpoint_identity),
        versions={"blip2_export": __version__, "torch": torch.__version__,
                  "transformers": transformers.__version__, "onnx": _onnx_version(), "opset": str(config.opset)},
    )
    manifest.validate()
    (tmp / MANIFEST_NAME).write_text(manifest.dumps())
    return manifest


def _export_one(tmp: Path, name: GraphName, module, io: GraphIO, sizes: dict, config: ExportConfig) -> GraphRecord:
    from blip2_export.graphs import example_inputs

    file = f"{name.value}.onnx"
    ext = export_onnx(module, example_inputs(io, sizes), io, tmp / file, config.opset,
                      config.external_data_threshold)
    rec = file_record(tmp, file)
    return GraphRecord(name=name.value, file=file, sha256=rec.sha256, io=io, precision="fp32",
                       external_data=tuple(file_record(tmp, e) for e in ext))


def write_text_side(tmp: Path, model, tokenizer) -> dict:
    """Token embedding table (the "prompt table") and tokenizer files; returns their file records."""
    emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
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


def _source(checkpoint, identity) -> dict:
    if checkpoint is None:
        return {"checkpoint": None}
    p = Path(checkpoint)
    return {"checkpoint": p.name, "weights_sha256": identity(p) if p.is_dir() else None}


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


def _replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)
