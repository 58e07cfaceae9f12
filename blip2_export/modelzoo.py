"""Random BLIP-2 models built from configs, and loading of real checkpoints from a local folder.

Tests, ``demo`` and ``bench`` need BLIP-2 models without downloading anything, so they are built here
from ``transformers`` configs with a real initialisation. Two transformers defaults would make such a
model degenerate: ``Blip2VisionConfig.initializer_range`` is 1e-10 (all vision weights ~0) and
``query_tokens`` are zero-initialised; both are fixed below. ``image_token_index`` is always set
(``generate`` needs it in transformers 5.x).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2_export.text_tokenizer import build_word_tokenizer
from blip2_export.weights import CheckpointWeights, ModuleWeights, weightless_model
from runtime.errors import Blip2Error
from runtime.integrity import sha256_file

# CLIP normalisation, as in the published BLIP-2 processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a random BLIP-2 model. ``llm`` is ``"opt"`` or ``"llama"`` (decoder-only; llama with grouped-query
    attention when ``llm_kv_heads`` < ``llm_heads``) or ``"t5"`` (encoder-decoder)."""

    llm: str = "opt"
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_ffn: int = 64
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 2
    qformer_ffn: int = 64
    num_query_tokens: int = 8
    llm_hidden: int = 32
    llm_layers: int = 2
    llm_heads: int = 2
    llm_ffn: int = 64
    llm_kv_heads: int | None = None  # llama: key/value heads (None: llm_heads)
    max_positions: int = 256
    extra_words: tuple[str, ...] = ()
    vocab_size: int | None = None  # LLM vocabulary rows; None: the tokenizer's size (padded up, as published)

    def validate(self) -> None:
        if self.llm not in ("opt", "llama", "t5"):
            raise Blip2Error(f"unknown LLM family {self.llm!r}; choose 'opt', 'llama' or 't5'")
        if self.llm_kv_heads is not None and (self.llm != "llama" or self.llm_heads % self.llm_kv_heads):
            raise Blip2Error(f"llm_kv_heads={self.llm_kv_heads} needs llm='llama' and to divide "
                             f"llm_heads={self.llm_heads}")
        for name in ("vision", "qformer", "llm"):
            hidden, heads = getattr(self, f"{name}_hidden"), getattr(self, f"{name}_heads")
            if hidden % heads:
                raise Blip2Error(f"{name}_hidden={hidden} must be divisible by {name}_heads={heads}")
        if self.image_size % self.patch_size:
            raise Blip2Error(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")


PRESETS: dict[str, ModelSpec] = {
    # seconds to build and export: every test uses it
    "tiny": ModelSpec(),
    # the spine issue's "mid-size": >= 6 layers in each part, hidden >= 384
    "mid": ModelSpec(
        image_size=64, patch_size=16, vision_hidden=384, vision_layers=6, vision_heads=6, vision_ffn=1536,
        qformer_hidden=384, qformer_layers=6, qformer_heads=6, qformer_ffn=1536, num_query_tokens=32,
        llm_hidden=384, llm_layers=6, llm_heads=6, llm_ffn=1536, max_positions=512,
    ),
    # shaped like a real small BLIP-2: ViT-B/16 at 224 px, 12-layer Q-Former at 768, OPT-125M-sized LLM
    "bench": ModelSpec(
        image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12, vision_ffn=3072,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12, qformer_ffn=3072, num_query_tokens=32,
        llm_hidden=768, llm_layers=12, llm_heads=12, llm_ffn=3072, max_positions=2048,
    ),
    # the published blip2-opt-2.7b widths (ViT-g 1408 = 16 heads of 88 at 224 px / patch 14, Q-Former 768,
    # OPT-2.7B 2560 = 32 heads of 80), 2 layers per part: int8 accuracy at real widths in seconds
    "published": ModelSpec(
        image_size=224, patch_size=14, vision_hidden=1408, vision_layers=2, vision_heads=16, vision_ffn=6144,
        qformer_hidden=768, qformer_layers=2, qformer_heads=12, qformer_ffn=3072, num_query_tokens=32,
        llm_hidden=2560, llm_layers=2, llm_heads=32, llm_ffn=10240, max_positions=2048,
    ),
}


def get_spec(preset: str | ModelSpec, **overrides: Any) -> ModelSpec:
    if isinstance(preset, ModelSpec):
        spec = preset
    elif preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise Blip2Error(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    spec = dataclasses.replace(spec, **overrides) if overrides else spec
    spec.validate()
    return spec


def make_config(spec: ModelSpec, tokenizer):
    """A ``Blip2Config`` for ``spec`` whose special ids match ``tokenizer``."""
    from transformers import (
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        LlamaConfig,
        OPTConfig,
        T5Config,
    )

    vision = Blip2VisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size,
        initializer_range=0.02,  # the default 1e-10 makes every random vision weight ~0
    )
    qformer = Blip2QFormerConfig(
        hidden_size=spec.qformer_hidden, num_hidden_layers=spec.qformer_layers,
        num_attention_heads=spec.qformer_heads, intermediate_size=spec.qformer_ffn,
        encoder_hidden_size=spec.vision_hidden, vocab_size=len(tokenizer),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    vocab = max(len(tokenizer), spec.vocab_size or 0)
    if spec.llm == "opt":
        text = OPTConfig(
            vocab_size=vocab, hidden_size=spec.llm_hidden, num_hidden_layers=spec.llm_layers,
            num_attention_heads=spec.llm_heads, ffn_dim=spec.llm_ffn, word_embed_proj_dim=spec.llm_hidden,
            max_position_embeddings=spec.max_positions, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, layerdrop=0.0, tie_word_embeddings=False, **ids,
        )
    elif spec.llm == "llama":
        text = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=spec.llm_hidden, num_hidden_layers=spec.llm_layers,
            num_attention_heads=spec.llm_heads, num_key_value_heads=spec.llm_kv_heads or spec.llm_heads,
            intermediate_size=spec.llm_ffn, max_position_embeddings=spec.max_positions, attention_dropout=0.0,
            tie_word_embeddings=False, **ids,
        )
    else:
        text = T5Config(
            vocab_size=vocab, d_model=spec.llm_hidden, d_kv=spec.llm_hidden // spec.llm_heads,
            d_ff=spec.llm_ffn, num_layers=spec.llm_layers, num_decoder_layers=spec.llm_layers,
            num_heads=spec.llm_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, **ids,
        )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=spec.num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )


def init_blip2_weights(model, seed: int = 0) -> None:
    """Give a freshly built BLIP-2 model non-degenerate random weights (see module docstring).

    Matrices get std 1/sqrt(fan_in) so every block mixes its inputs, norms start at 1, vectors
    (biases, query tokens, embeddings) are small or unit normal. Untied LM heads make outputs depend
    on the image and prompt instead of repeating the last token.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if hasattr(model, "query_tokens"):  # zero by default in transformers
            model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=g))
        emb = model.get_input_embeddings()
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))


def make_image_processor(spec: ModelSpec):
    return _image_processor_class()(
        size={"height": spec.image_size, "width": spec.image_size}, resample=3,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
    )


def build_random_model(preset: str | ModelSpec = "tiny", seed: int = 0, **overrides: Any):
    """Return ``(model, tokenizer, image_processor)`` for a random BLIP-2 with real init, in eval mode."""
    import torch
    from transformers import Blip2ForConditionalGeneration


    spec = get_spec(preset, **overrides)
    tokenizer = build_word_tokenizer(spec.extra_words, add_bos=spec.llm != "t5", add_eos=spec.llm == "t5")
    config = make_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    init_blip2_weights(model, seed)
    if spec.llm == "t5":
        damp_tied_embeddings(model)
    model.eval()
    return model, tokenizer, make_image_processor(spec)


def damp_tied_embeddings(model, scale: float = 0.1) -> None:
    """Shrink a T5 LLM's shared embedding table, which transformers 5 always ties to its LM head.

    ``T5Config`` forces ``tie_word_embeddings=True``, so the head cannot be untied as for OPT. With
    unit-normal embeddings the residual stream then carries the input token so strongly that a random
    model predicts it again forever (``<pad>`` after ``<pad>``); at 0.1 the blocks decide the next token
    and the output depends on the image and the prompt.
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)


def save_checkpoint(model, tokenizer, image_processor, path: str | Path) -> Path:
    """Write a transformers-layout BLIP-2 folder (config, safetensors, tokenizer, processor)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    image_processor.save_pretrained(path)
    write_processor_config(path, model.config.num_query_tokens)
    return path


def write_processor_config(path: str | Path, num_query_tokens: int) -> None:
    """``processor_config.json``: Blip2Processor expands ``<image>`` ``num_query_tokens`` times, as published."""
    proc_cfg = {"processor_class": "Blip2Processor", "num_query_tokens": int(num_query_tokens)}
    (Path(path) / "processor_config.json").write_text(json.dumps(proc_cfg, indent=2) + "\n")


# tokenizer_config.json keys that only record the truncation / padding state the backend tokenizer had when it
# was saved (the last call's ``truncation=True, max_length=...``), plus loader bookkeeping. A saved
# ``max_length`` becomes every later call's default: Blip2Processor subtracts num_query_tokens from it and a
# negative length fails inside the tokenizer ("OverflowError: can't convert negative int to unsigned").
CALL_STATE_KEYS = ("max_length", "stride", "truncation_strategy", "pad_to_multiple_of", "pad_token_type_id",
                   "is_local", "local_files_only")
IMAGE_TOKEN = "<image>"


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """``tokenizer.save_pretrained(path)``, then :func:`standardize_tokenizer_files` on what it wrote."""
    tokenizer.save_pretrained(path)
    standardize_tokenizer_files(path)


def standardize_tokenizer_files(path: str | Path) -> list[str]:
    """Make a folder's tokenizer files load the way ``Blip2Processor`` (transformers 5) needs; return what changed.

    * no saved truncation / padding state (``tokenizer.json`` ``truncation``/``padding``, and the
      :data:`CALL_STATE_KEYS` of ``tokenizer_config.json``);
    * ``<image>`` is a plain added special token, not a *named* ``image_token``: transformers returns a named
      token as a ``str``, and Blip2Processor then fails on ``image_token.content``; without the name the
      processor takes the tokenizer's own ``<image>`` (same id) as an ``AddedToken``.

    The vocabulary, ids and special tokens are unchanged.
    """
    path = Path(path)
    changed: list[str] = []
    tj = path / "tokenizer.json"
    if tj.is_file():
        raw = json.loads(tj.read_text())
        if raw.get("truncation") is not None or raw.get("padding") is not None:
            raw["truncation"] = raw["padding"] = None
            tj.write_text(json.dumps(raw, indent=2, ensure_ascii=False))
            changed.append("tokenizer.json: truncation/padding state")
    tc = path / "tokenizer_config.json"
    if not tc.is_file():
        return changed
    cfg = json.loads(tc.read_text())
    for k in CALL_STATE_KEYS:
        if k in cfg:
            cfg.pop(k)
            changed.append(f"tokenizer_config.json: {k}")
    named = False
    if cfg.pop("image_token", None) is not None:
        named = True
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        d = cfg.get(key)
        if isinstance(d, dict) and "image_token" in d:
            d.pop("image_token")
            named = True
            if key == "model_specific_special_tokens" and not d:
                cfg.pop(key)
            elif key == "extra_special_tokens":
                cfg[key] = list(d.values())
    if named:
        extra = cfg.get("extra_special_tokens")
        extra = list(extra) if isinstance(extra, list) else []
        if IMAGE_TOKEN not in extra:
            extra.append(IMAGE_TOKEN)
        cfg["extra_special_tokens"] = extra
        changed.append("tokenizer_config.json: image_token is an added special token, not a named one")
    if changed:
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return changed


def make_random_checkpoint(path: str | Path, preset: str | ModelSpec = "tiny", seed: int = 0, **overrides: Any) -> Path:
    model, tok, proc = build_random_model(preset, seed, **overrides)
    return save_checkpoint(model, tok, proc, path)


def write_random_checkpoint(path: str | Path, preset: str | ModelSpec = "tiny", seed: int = 0,
                            shard_bytes: int = 4 << 30, **overrides: Any) -> Path:
    """A random checkpoint of any size, written one tensor at a time (fp32 safetensors shards + index).

    For models larger than memory (the full-size check): the model is built on the meta device and each
    parameter's values are drawn and written in turn, with :func:`init_blip2_weights`'s rules (matrices
    N(0, 1/fan_in), norms 1, vectors 0.02 N(0, 1), query tokens and the token embeddings N(0, 1)); the
    draws differ from :func:`make_random_checkpoint`'s. The folder loads with transformers as usual.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration


    spec = get_spec(preset, **overrides)
    tokenizer = build_word_tokenizer(spec.extra_words, add_bos=spec.llm == "opt", add_eos=spec.llm == "t5")
    config = make_config(spec, tokenizer)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    embed = model.get_input_embeddings().weight
    params = list(model.named_parameters())  # tied parameters once, as save_pretrained writes them
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, p in params:
        nbytes = p.numel() * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, p))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, p in shard:
            n = p.numel() * 4
            header[name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = path / f".{file}.tmp"
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, p in shard:
                if "norm" in name and name.endswith("weight") and p.dim() == 1:
                    t = torch.ones(p.shape)
                else:  # in place: one tensor's bytes at a time
                    t = torch.randn(p.shape, generator=g)
                    if p.dim() >= 2 and p is not embed and name != "query_tokens":
                        t.div_(p.shape[-1] ** 0.5)
                    elif p.dim() < 2:
                        t.mul_(0.02)
                f.write(memoryview(t.contiguous().numpy()).cast("B"))
                del t
        tmp.replace(path / file)
    total = sum(p.numel() * 4 for _, p in params)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    make_image_processor(spec).save_pretrained(path)
    write_processor_config(path, config.num_query_tokens)
    return path


def _image_processor_class():
    """transformers' PIL BLIP processor: the one that reproduces the published models' preprocessing.

    ``BlipImageProcessor`` runs its torchvision backend when torchvision is installed (its resize differs
    from PIL's by up to ~1e-2 after normalisation) and falls back to this class otherwise; the runtime
    replays the PIL one, so parity compares against it whatever else is installed.
    """
    try:
        from transformers import BlipImageProcessorPil

        return BlipImageProcessorPil
    except ImportError:  # an older transformers: BlipImageProcessor is the PIL one
        from transformers import BlipImageProcessor

        return BlipImageProcessor


def load_checkpoint(path: str | Path, dtype: str = "float32"):
    """Load ``(model, tokenizer, image_processor)`` from a local transformers BLIP-2 folder.

    ``dtype``: torch dtype name of the weights ("float16" for the GPU baseline; transformers keeps the
    Q-Former in fp32 either way). Raises ``Blip2Error`` with a clear message when the folder is not a
    BLIP-2 checkpoint.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    path, config, tokenizer, image_processor = _read_checkpoint(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer, image_processor


def load_checkpoint_lazy(path: str | Path):
    """``(model, tokenizer, image_processor, weights)`` for exporting without loading the weights.

    The model is built from the checkpoint's config with parameters that take no memory
    (:func:`blip2_export.weights.weightless_model`); ``weights`` reads each one from the safetensors
    when a graph is written. A checkpoint with only ``*.bin`` weights (pickles cannot be read one tensor
    at a time) is loaded whole, its own tensors being the weights.
    """

    path, config, tokenizer, image_processor = _read_checkpoint(path)
    if not list(path.glob("*.safetensors")):
        model, tokenizer, image_processor = load_checkpoint(path)
        return model, tokenizer, image_processor, ModuleWeights()
    model = weightless_model(config)
    if (path / "generation_config.json").is_file():  # from_pretrained reads it too (generation_ids uses it)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer, image_processor, CheckpointWeights(path, model)


def _read_checkpoint(path: str | Path):
    """Check a checkpoint folder and read everything but its weights: ``(path, config, tokenizer,
    image_processor)``."""
    from transformers import AutoTokenizer, Blip2Config

    path = Path(path)
    if not path.is_dir():
        raise Blip2Error(f"checkpoint folder not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise Blip2Error(f"{path} has no config.json: not a transformers checkpoint folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise Blip2Error(f"{cfg_file} is not valid JSON: {e}") from None
    if raw.get("model_type") != "blip-2":
        raise Blip2Error(f"{path} holds a {raw.get('model_type')!r} model, not a BLIP-2 ('blip-2') checkpoint")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise Blip2Error(f"{path} has no weight files (*.safetensors or *.bin)")
    if RETRIEVAL_ARCHITECTURE in (raw.get("architectures") or []):
        raise Blip2Error(f"{path} is a stage-1 retrieval checkpoint ({RETRIEVAL_ARCHITECTURE}), not a "
                         "captioning one", hint="load it with load_retrieval_checkpoint")
    config = Blip2Config.from_pretrained(path)
    proc_file = path / "processor_config.json"
    if proc_file.is_file():  # Blip2Processor expands <image> this many times: it must be the model's count
        try:
            nq = json.loads(proc_file.read_text()).get("num_query_tokens")
        except (json.JSONDecodeError, AttributeError):
            raise Blip2Error(f"{proc_file} is not a JSON object") from None
        if nq is not None and nq != config.num_query_tokens:
            raise Blip2Error(f"processor_config.json num_query_tokens {nq} differs from config.json "
                             f"num_query_tokens {config.num_query_tokens}",
                             hint=f"set num_query_tokens to {config.num_query_tokens} in processor_config.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config.image_token_index is None:
        # Older published checkpoints predate the <image> placeholder; generate in transformers 5 needs one.
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id is None or image_id == tokenizer.unk_token_id:
            tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
            image_id = tokenizer.convert_tokens_to_ids("<image>")
        config.image_token_index = image_id
    if (path / "preprocessor_config.json").is_file():
        image_processor = _image_processor_class().from_pretrained(path)
    else:
        image_processor = _image_processor_class()(
            size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
            resample=3, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        )
    return path, config, tokenizer, image_processor


def checkpoint_identity(path: str | Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes), for the manifest."""
    import hashlib


    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# -- stage-1 retrieval models (Blip2ForImageTextRetrieval) -------------------------------------------
RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"


def checkpoint_architectures(path: str | Path) -> list[str]:
    """``architectures`` of a checkpoint folder's config.json ([] when absent or unreadable)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    archs = raw.get("architectures") or []
    return [str(a) for a in archs] if isinstance(archs, list) else []


def is_retrieval_checkpoint(path: str | Path) -> bool:
    return RETRIEVAL_ARCHITECTURE in checkpoint_architectures(path)


def make_retrieval_config(spec: ModelSpec, tokenizer, embed_dim: int | None = None):
    """A ``Blip2Config`` for the stage-1 model: ViT + Q-Former with its BERT-style text side, projections."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=spec.qformer_hidden, num_hidden_layers=spec.qformer_layers,
        num_attention_heads=spec.qformer_heads, intermediate_size=spec.qformer_ffn,
        encoder_hidden_size=spec.vision_hidden, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_qformer_text_input=True,
        max_position_embeddings=spec.max_positions,
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=spec.num_query_tokens,
        image_text_hidden_size=embed_dim or min(256, spec.qformer_hidden),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )


def build_random_retrieval_model(preset: str | ModelSpec = "tiny", seed: int = 0, **overrides: Any):
    """``(model, tokenizer, image_processor)`` for a random ``Blip2ForImageTextRetrieval`` with real init.

    The tokenizer frames a text as ``<s> words </s>``, the analogue of BERT's ``[CLS] words [SEP]``.
    """
    import torch
    from transformers import Blip2ForImageTextRetrieval


    spec = get_spec(preset, **overrides)
    tokenizer = build_word_tokenizer(spec.extra_words, add_bos=True, add_eos=True)
    tokenizer.padding_side = "right"
    config = make_retrieval_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    init_blip2_weights(model, seed)
    with torch.no_grad():  # BERT-style "LayerNorm.weight" escapes init_blip2_weights' "norm" match: unit gains,
        for name, p in model.named_parameters():  # else every feature collapses onto the LayerNorm biases
            if name.endswith("LayerNorm.weight"):
                p.fill_(1.0)
    model.eval()
    return model, tokenizer, make_image_processor(spec)


def make_random_retrieval_checkpoint(path: str | Path, preset: str | ModelSpec = "tiny", seed: int = 0,
                                     **overrides: Any) -> Path:
    model, tok, proc = build_random_retrieval_model(preset, seed, **overrides)
    return save_checkpoint(model, tok, proc, path)


def load_retrieval_checkpoint(path: str | Path):
    """Load ``(model, tokenizer, image_processor)`` from a local ``Blip2ForImageTextRetrieval`` folder."""
    import torch
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    path = Path(path)
    if not (path / "config.json").is_file():
        raise Blip2Error(f"{path} has no config.json: not a transformers checkpoint folder")
    if not is_retrieval_checkpoint(path):
        raise Blip2Error(f"{path} is not a {RETRIEVAL_ARCHITECTURE} checkpoint "
                         f"(architectures: {checkpoint_architectures(path) or 'none'})")
    if not (list(path.glob("*.safetensors")) + list(path.glob("*.bin"))):
        raise Blip2Error(f"{path} has no weight files (*.safetensors or *.bin)")
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    vision: Any = model.config.vision_config
    size = int(vision.image_size)
    if (path / "preprocessor_config.json").is_file():
        image_processor = _image_processor_class().from_pretrained(path)
    else:
        image_processor = _image_processor_class()(size={"height": size, "width": size}, resample=3,
                                             image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    return model, tokenizer, image_processor
