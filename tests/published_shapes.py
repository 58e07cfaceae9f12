"""Checkpoints shaped like the published BLIP-2 models, written by transformers itself.

The config dicts below are the published ``config.json`` files as they are on the Hub (Salesforce/
blip2-opt-2.7b and blip2-flan-t5-xl, transformers 4.47 revisions; blip2-itm-vit-g for retrieval): fields
they omit take transformers' defaults, which is how transformers reads them. Only what makes a test
run on 2 CPU cores in about a minute is reduced, in :data:`REDUCED`: layer counts, the LLMs' FFN sizes
(OPT's 10240 and T5's 5120: two thirds of the weights, and no shape the export cares about), and the
vocabulary, which is the size of the tokenizer trained here padded to a multiple of 64 as the published
OPT's 50304 pads 50266 tokens. Hidden widths, heads and head sizes (ViT-g 1408 = 16 x 88, OPT 2560 =
32 x 80, T5 2048 = 32 x 64), the ViT and Q-Former FFNs, image and patch sizes (224 / 14: 257 patches),
query count, activations and special ids keep their published values.

Tokenizers are trained here with ``tokenizers`` in the published types: a byte-level BPE with OPT's
specials (``</s>`` prepended to every text, ``GPT2Tokenizer``), a Unigram/Metaspace one with ``</s>``
appended and 100 ``<extra_id_*>`` tokens (``T5Tokenizer``), and a WordPiece one framed ``[CLS] .. [SEP]``
(``BertTokenizer``) for the Q-Former's text side; each gets ``<image>`` as the published ones do.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

# -- the published configs (as on the Hub) ------------------------------------------------------------
BLIP2_OPT_2_7B = {
    "architectures": ["Blip2ForConditionalGeneration"],
    "image_text_hidden_size": 256,
    "image_token_index": 50265,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "text_config": {
        "_name_or_path": "facebook/opt-2.7b",
        "activation_dropout": 0.0,
        "architectures": ["OPTForCausalLM"],
        "eos_token_id": 50118,
        "ffn_dim": 10240,
        "hidden_size": 2560,
        "model_type": "opt",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "prefix": "</s>",
        "torch_dtype": "float16",
        "vocab_size": 50304,
        "word_embed_proj_dim": 2560,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "use_decoder_only_language_model": True,
    "vision_config": {"dropout": 0.0, "initializer_factor": 1.0, "model_type": "blip_2_vision_model",
                      "num_channels": 3, "projection_dim": 512},
}

# blip2-flan-t5-xl; its text_config is Flan-T5-XL's, without a bos_token_id (T5 has none).
BLIP2_FLAN_T5_XL = {
    "architectures": ["Blip2ForConditionalGeneration"],
    "image_text_hidden_size": 256,
    "image_token_index": 32100,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "text_config": {
        "architectures": ["T5ForConditionalGeneration"],
        "classifier_dropout": 0.0,
        "d_ff": 5120,
        "d_kv": 64,
        "d_model": 2048,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "n_positions": 512,
        "num_decoder_layers": 24,
        "num_heads": 32,
        "num_layers": 24,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": 32128,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "use_decoder_only_language_model": False,
    "vision_config": {"dropout": 0.0, "initializer_factor": 1.0, "model_type": "blip_2_vision_model",
                      "num_channels": 3, "projection_dim": 512},
}

# blip2-itm-vit-g (stage 1): ViT-g + the Q-Former's BERT text side, ITC/ITM heads.
BLIP2_ITM_VIT_G = {
    "architectures": ["Blip2ForImageTextRetrieval"],
    "image_text_hidden_size": 256,
    "image_token_index": None,  # set from the tokenizer's <image> below
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "qformer_config": {"model_type": "blip_2_qformer", "use_qformer_text_input": True, "vocab_size": 30523},
    "use_decoder_only_language_model": True,
    "vision_config": {"model_type": "blip_2_vision_model", "num_channels": 3, "projection_dim": 512},
}

# The published preprocessor_config.json of every BLIP-2 (224 px, bicubic, CLIP mean/std).
PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "BlipImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}

# What is reduced to run here (see the module docstring); everything else is published.
REDUCED = {"vision_layers": 1, "qformer_layers": 2, "llm_layers": 2, "opt_ffn_dim": 1024, "t5_d_ff": 512}

# -- a varied corpus: the tokenizers are trained on it, and the round-trip strings come from it ---------
WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "table", "with", "two", "three", "red", "blue", "green", "small", "large", "picture", "what", "is", "in", "there", "how", "many", "people", "street", "car", "tree", "sky", "water", "man", "woman", "person", "sitting", "standing", "next", "to", "top", "left", "right", "Question", "Answer", "café", "naïve", "über", "größer", "straße", "déjà", "vu", "señor", "niño", "mañana", "façade", "smörgåsbord", "東京", "写真", "猫", "犬", "テーブル", "北京", "图片", "사진", "고양이", "Москва", "кошка", "собака", "фото", "Αθήνα", "γάτα", "مرحبا", "صورة", "नमस्ते", "तस्वीर", "🙂", "🐱", "🚗", "☕", "€5", "£3", "¥100", "½", "°", "©", "™"]
PUNCT = list(".,;:!?'\"()[]{}-_/\\@#%&*+=<>|~`^$")


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """``n`` strings: words in several scripts, emoji, punctuation, digits, odd spacing, newlines, tabs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(WORDS))
            elif r < 0.75:
                parts.append(rng.choice(PUNCT))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            else:
                parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))))
        sep = rng.choice([" ", " ", " ", "  ", "", "\n", "\t", " \n "])
        s = sep.join(parts)
        if i % 7 == 0:
            s = f"Question: {s}? Answer:"
        if i % 11 == 0:
            s = " " + s + " "
        out.append(s)
    return out


def _save_tokenizer(tk, path: Path, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k.endswith("_token")}, indent=2))


def train_opt_tokenizer(path: Path, vocab_size: int = 1000) -> None:
    """Byte-level BPE as OPT's: <s>=0 <pad>=1 </s>=2 <unk>=3, '</s>' prepended, '<image>' added last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(varied_strings(3000, seed=1), trainer)
    tk.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                      special_tokens=[("</s>", 2)])
    tk.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    _save_tokenizer(tk, path, {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
        "errors": "replace", "model_max_length": 1000000000000000019884624838656,
        "processor_class": "Blip2Processor", "extra_special_tokens": {"image_token": "<image>"},
    })


def train_t5_tokenizer(path: Path, vocab_size: int = 1000) -> None:
    """Unigram + Metaspace as T5's: <pad>=0 </s>=1 <unk>=2, '</s>' appended, 100 <extra_id_*>, '<image>'."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tk.train_from_iterator(varied_strings(3000, seed=2), trainer)
    extra = [f"<extra_id_{i}>" for i in range(99, -1, -1)]  # T5: <extra_id_0> is the last of them
    tk.add_special_tokens([AddedToken(e, special=True) for e in extra])
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tk.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    _save_tokenizer(tk, path, {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": 100, "additional_special_tokens": extra, "model_max_length": 512,
        "processor_class": "Blip2Processor", "extra_special_tokens": {"image_token": "<image>"},
    })


def train_bert_tokenizer(path: Path, vocab_size: int = 800) -> None:
    """WordPiece as bert-base-uncased's: [PAD]=0 .. , '[CLS] $A [SEP]', lower-cased, '<image>' added."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(varied_strings(3000, seed=3), trainer)
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    _save_tokenizer(tk, path, {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]", "model_max_length": 512,
        "extra_special_tokens": {"image_token": "<image>"},
    })


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def write_checkpoint(path: Path, family: str, *, dtype: str = "float32", max_shard_size: str | None = None,
                     seed: int = 0) -> Path:
    """A published-shape checkpoint folder for ``family`` in {"opt", "t5", "itm"}, written by transformers.

    ``dtype`` ("float16", "bfloat16") stores the weights as the published fp16 shards do;
    ``max_shard_size`` splits them into shards with a ``model.safetensors.index.json``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
    )

    from blip2_export.modelzoo import damp_tied_embeddings, init_blip2_weights

    path = Path(path)
    {"opt": train_opt_tokenizer, "t5": train_t5_tokenizer, "itm": train_bert_tokenizer}[family](path)
    tok = AutoTokenizer.from_pretrained(path)
    image_id = tok.convert_tokens_to_ids("<image>")
    raw = copy.deepcopy({"opt": BLIP2_OPT_2_7B, "t5": BLIP2_FLAN_T5_XL, "itm": BLIP2_ITM_VIT_G}[family])
    raw["image_token_index"] = image_id
    raw["vision_config"]["num_hidden_layers"] = REDUCED["vision_layers"]
    raw["qformer_config"]["num_hidden_layers"] = REDUCED["qformer_layers"]
    t = raw.get("text_config")
    if family == "opt":
        t.update(num_hidden_layers=REDUCED["llm_layers"], vocab_size=_padded(len(tok)), ffn_dim=REDUCED["opt_ffn_dim"])
        t["eos_token_id"] = tok.convert_tokens_to_ids("Ċ")  # published: 50118, the "\n" token
    elif family == "t5":
        t.update(num_layers=REDUCED["llm_layers"], num_decoder_layers=REDUCED["llm_layers"],
                 vocab_size=_padded(len(tok)), d_ff=REDUCED["t5_d_ff"])
    else:
        raw["qformer_config"]["vocab_size"] = len(tok)
        raw["qformer_config"]["pad_token_id"] = tok.pad_token_id
    raw.pop("architectures")
    config = Blip2Config(**raw)
    torch.manual_seed(seed)
    cls = Blip2ForImageTextRetrieval if family == "itm" else Blip2ForConditionalGeneration
    model = cls(config)
    init_blip2_weights(model, seed)  # transformers' own init leaves ViT weights ~1e-10 and queries at 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):  # BERT-style names escape init_blip2_weights' "norm"
                p.fill_(1.0)
    if family == "t5":
        damp_tied_embeddings(model)
    if family == "opt":  # rows past the tokenizer (vocab padding) are never predicted by a trained model
        with torch.no_grad():
            model.get_output_embeddings().weight[len(tok):] = 0.0
    model = model.to(getattr(torch, dtype)).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    if family != "itm":
        (path / "processor_config.json").write_text(json.dumps(
            {"processor_class": "Blip2Processor", "num_query_tokens": config.num_query_tokens}, indent=2))
    return path


def write_image_folder(folder: Path, size: tuple[int, int] = (96, 72)) -> Path:
    """Images of the modes users have, each with content the mode actually changes.

    An RGBA PNG whose alpha varies from 0 to 255 over coloured pixels (compositing onto white differs
    from dropping alpha by up to ~250 levels), an LA PNG and a P PNG with a transparent palette entry,
    a 16-bit grey PNG spanning 0..65535, a CMYK JPEG, a grey JPEG, and a JPEG with EXIF orientation 6.
    """
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8)
    alpha = (xx * 255 // (w - 1)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba_transparent.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha[::-1]]), "LA").save(folder / "la_transparent.png")
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 3
    pal.save(folder / "p_transparent.png", transparency=3)
    Image.fromarray((xx * 65535 // (w - 1)).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(rgb[..., 1]).save(folder / "grey.jpg", quality=95)
    img = Image.fromarray(rgb[:, : w // 2])
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    return folder
