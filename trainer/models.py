"""The models the trainer optimises, built on the transformers ``Blip2*`` classes.

* :class:`Stage1` wraps ``Blip2ForImageTextRetrieval`` (frozen vision model, Q-Former with text input,
  projections, ITM head) and adds what the paper's stage 1 needs besides: the learnable ITC temperature
  and the ITG language-model head ([DEC] token). Its ``forward`` returns the summed ITC + ITM + ITG loss.
* :class:`Stage2` wraps ``Blip2ForConditionalGeneration`` with a frozen vision model and a frozen
  OPT (decoder-only, LM loss) or T5 (encoder-decoder, prefix-LM loss) language model.

Both save folders that the transformers classes load as they are (stage 1 keeps its extra weights in
``stage1_extras.safetensors`` beside ``model.safetensors``). Sizes come from a ``modelzoo.ModelSpec`` so
the stage-2 folder is exactly what ``blip2_export.modelzoo.load_checkpoint`` and the exporter expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_export.modelzoo import (
    ModelSpec,
    make_config,
    make_image_processor,
    save_checkpoint,
    save_tokenizer,
    write_processor_config,
)
from blip2_export.text_tokenizer import build_word_tokenizer
from runtime.errors import Blip2Error
from trainer import losses

# The trainer's default sizes: 64 px images, 8x8 patches, 32 queries as in the paper, small everything.
TRAINER_SPEC = ModelSpec(
    llm="opt", image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4, vision_ffn=256,
    qformer_hidden=128, qformer_layers=4, qformer_heads=4, qformer_ffn=256, num_query_tokens=32,
    llm_hidden=128, llm_layers=2, llm_heads=4, llm_ffn=256, max_positions=64,
)
EXTRAS_FILE = "stage1_extras.safetensors"
TRAINER_FILE = "trainer_spec.json"


def make_tokenizer(words, llm: str = "opt"):
    """The word-level tokenizer of all trainer models. OPT-style: ``<s>`` first; T5-style: ``</s>`` last.

    The Q-Former text encoder uses the OPT-style one plus ``</s>``: ``<s>`` is its [CLS], and ITG
    replaces it with ``[DEC]`` and predicts the caption up to ``</s>``.
    """

    if llm == "qformer":
        tok = build_word_tokenizer(words, add_bos=True, add_eos=True)
        tok.padding_side = "right"  # [CLS] first, as BERT's: Blip2Processor pads a batch of texts on the right
        return tok
    return build_word_tokenizer(words, add_bos=llm == "opt", add_eos=llm == "t5")


def spec_to_json(spec: ModelSpec) -> dict:
    import dataclasses

    d = dataclasses.asdict(spec)
    d["extra_words"] = list(spec.extra_words)
    return d


def spec_from_json(d: dict) -> ModelSpec:
    d = dict(d)
    d["extra_words"] = tuple(d.get("extra_words", ()))
    return ModelSpec(**d)


def tokenize(tokenizer, texts: list[str], max_len: int = 32, eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (training wants captions aligned at position 0).

    ``eos`` appends ``</s>`` where the tokenizer does not (OPT-style): a caption target must end, so the
    model learns to stop, while prompts encoded by the saved tokenizer stay ``<s> prompt``.
    """
    rows = [tokenizer(t, truncation=True, max_length=max_len - 1).input_ids for t in texts]
    if eos:
        rows = [r if r and r[-1] == tokenizer.eos_token_id else r + [tokenizer.eos_token_id] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    return ids, att


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style init (normal 0.02, zero bias, unit norms) for freshly built trainable parts."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- vision


def build_vision(spec: ModelSpec, tokenizer):
    from transformers import Blip2VisionModel

    cfg = make_config(spec, tokenizer).vision_config
    model = Blip2VisionModel(cfg)
    init_weights(model)
    nn.init.normal_(model.embeddings.class_embedding, std=0.02)
    nn.init.normal_(model.embeddings.position_embedding, std=0.02)
    return model


def load_vision(path: str | Path):
    from transformers import Blip2VisionModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise Blip2Error(f"{path} is not a vision-model folder", hint="train one with `blip2-train unimodal`")
    return Blip2VisionModel.from_pretrained(path, dtype=torch.float32)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients; the wrappers' ``train()`` keeps frozen parts in eval mode."""
    module.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------------------------------------- stage 1


class ItgHead(nn.Module):
    """BERT LM head (dense, GELU, LayerNorm, decoder tied to the Q-Former word embeddings)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


class Stage1(nn.Module):
    """Q-Former representation learning on a frozen image encoder (BLIP-2 stage 1)."""

    def __init__(self, spec: ModelSpec, tokenizer, objectives=("itc", "itm", "itg"), seed: int = 0):
        super().__init__()
        from transformers import Blip2ForImageTextRetrieval

        bad = set(objectives) - {"itc", "itm", "itg"}
        if bad or not objectives:
            raise Blip2Error(f"unknown objectives {sorted(bad)}; choose from itc, itm, itg")
        self.spec, self.tokenizer, self.objectives, self.seed = spec, tokenizer, tuple(objectives), seed
        config = make_config(spec, tokenizer)
        config.qformer_config.use_qformer_text_input = True
        config.qformer_config.max_position_embeddings = spec.max_positions
        config.image_text_hidden_size = spec.qformer_hidden
        torch.manual_seed(seed)
        self.blip = Blip2ForImageTextRetrieval(config)
        init_weights(self.blip)
        nn.init.normal_(self.blip.query_tokens, std=0.02)  # paper: 32 learned queries, std 0.02
        freeze(self.blip.vision_model)
        # short sequences (32 queries + a caption): plain matmul attention is several times faster on CPU
        # than SDPA's flash kernel with the explicit masks stage 1 needs
        self.blip.qformer.config._attn_implementation = "eager"
        self.itg_head = ItgHead(spec.qformer_hidden, len(tokenizer))
        init_weights(self.itg_head)
        # parameters no objective uses get no gradient (DDP needs every trainable parameter used)
        if "itg" not in self.objectives:
            self.itg_head.requires_grad_(False)
        if "itm" not in self.objectives:
            self.blip.itm_head.requires_grad_(False)
        if "itc" not in self.objectives:  # ITM alone uses the ITC features only to pick negatives
            for m in (self.blip.vision_projection, self.blip.text_projection):
                m.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(0.07), requires_grad="itc" in self.objectives)
        self.dec_id = tokenizer.convert_tokens_to_ids("[DEC]")
        self.step = 0  # set by the loop; seeds the hard-negative sampling

    def train(self, mode: bool = True):
        super().train(mode)
        self.blip.vision_model.eval()
        return self

    # -- pieces -----------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.blip.vision_model(pixel_values=pixel_values).last_hidden_state

    def _qformer(self, queries, input_ids, mask, image_embeds):
        """Run the Q-Former on [queries ; text] with an explicit [B, L, L] attention mask (True = attend)."""
        emb = self.blip.embeddings(input_ids=input_ids, query_embeds=queries)
        h = self.blip.qformer.dropout(self.blip.qformer.layernorm(emb))
        if self.blip.qformer.config._attn_implementation == "eager":
            mask4 = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~mask, torch.finfo(h.dtype).min)[:, None]
        else:
            mask4 = mask[:, None]
        q = 0 if queries is None else queries.shape[1]
        return self.blip.qformer.encoder(h, attention_mask=mask4, encoder_hidden_states=image_embeds,
                                         query_length=q).last_hidden_state

    def query_features(self, image_embeds):
        B, Q = image_embeds.shape[0], self.blip.query_tokens.shape[1]
        queries = self.blip.query_tokens.expand(B, -1, -1)
        mask = torch.ones(B, Q, Q, dtype=torch.bool, device=image_embeds.device)
        out = self._qformer(queries, None, mask, image_embeds)
        return F.normalize(self.blip.vision_projection(out), dim=-1)

    def text_features(self, ids, att):
        mask = att.bool()[:, None, :].expand(-1, ids.shape[1], -1)
        out = self._qformer(None, ids, mask, None)
        return F.normalize(self.blip.text_projection(out[:, 0]), dim=-1)

    def itm_logits(self, image_embeds, ids, att):
        B, Q = ids.shape[0], self.blip.query_tokens.shape[1]
        queries = self.blip.query_tokens.expand(B, -1, -1)
        keys = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=att.device), att.bool()], 1)
        mask = keys[:, None, :].expand(-1, keys.shape[1], -1)
        out = self._qformer(queries, ids, mask, image_embeds)
        return self.blip.itm_head(out[:, :Q]).mean(1)

    def itg_loss(self, image_embeds, ids, att):
        B, Q = ids.shape[0], self.blip.query_tokens.shape[1]
        queries = self.blip.query_tokens.expand(B, -1, -1)
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_id
        mask = losses.itg_mask(Q, att)
        out = self._qformer(queries, dec_ids, mask, image_embeds)
        logits = self.itg_head(out[:, Q:-1], self.blip.embeddings.word_embeddings.weight)
        labels = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=-100, label_smoothing=0.1, reduction="sum")
        return losses.token_mean(total, (labels != -100).sum())

    # -- training ---------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.image_embeds(pixel_values)
        metrics = {}
        total = 0.0
        need_itc = "itc" in self.objectives or "itm" in self.objectives
        if need_itc:
            img = self.query_features(image_embeds)
            txt = self.text_features(input_ids, attention_mask)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            g = losses.gather_batch(img=img, txt=txt, ids=input_ids, att=attention_mask, emb=image_embeds)
            same = losses.same_text(input_ids, attention_mask, g["ids"], g["att"])
            start = losses.rank() * input_ids.shape[0]
            sim_i2t, sim_t2i = losses.itc_similarities(img, txt, g["img"], g["txt"], self.temp)
            if "itc" in self.objectives:
                itc = losses.itc_loss(sim_i2t, sim_t2i, start, same)
                total = total + itc
                metrics["itc"] = itc.detach()
        if "itm" in self.objectives:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            neg_txt, neg_img = losses.sample_hard_negatives(
                g["img"].detach(), g["txt"].detach(), self.temp.detach(), g["ids"], g["att"], gen,
                start, input_ids.shape[0])
            ids3 = torch.cat([input_ids, g["ids"][neg_txt], input_ids])
            att3 = torch.cat([attention_mask, g["att"][neg_txt], attention_mask])
            emb3 = torch.cat([image_embeds, image_embeds, g["emb"][neg_img]])
            B = input_ids.shape[0]
            labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(
                input_ids.device)
            itm = F.cross_entropy(self.itm_logits(emb3, ids3, att3).float(), labels)
            total = total + itm
            metrics["itm"] = itm.detach()
        if "itg" in self.objectives:
            itg = self.itg_loss(image_embeds, input_ids, attention_mask)
            total = total + itg
            metrics["itg"] = itg.detach()
        return total, metrics

    # -- saving -----------------------------------------------------------------------------------
    def save(self, path: str | Path, image_processor=None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        self.blip.save_pretrained(path)
        save_tokenizer(self.tokenizer, path)
        # transformers' retrieval forward reads the text after num_query_tokens <image> placeholders, which
        # Blip2Processor only puts there when processor_config.json gives their count
        write_processor_config(path, self.blip.config.num_query_tokens)
        (image_processor or make_image_processor(self.spec)).save_pretrained(path)
        extras = {f"itg_head.{k}": v.contiguous() for k, v in self.itg_head.state_dict().items()}
        extras["temp"] = self.temp.detach().reshape(1)
        save_file(extras, str(path / EXTRAS_FILE))
        (path / TRAINER_FILE).write_text(json.dumps(
            {"stage": 1, "spec": spec_to_json(self.spec), "objectives": list(self.objectives)}, indent=2))

    @classmethod
    def load(cls, path: str | Path):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

        path = Path(path)
        meta_file = path / TRAINER_FILE
        if not meta_file.is_file():
            raise Blip2Error(f"{path} is not a stage-1 folder (no {TRAINER_FILE})",
                             hint="train one with `blip2-train stage1`")
        meta = json.loads(meta_file.read_text())
        tok = AutoTokenizer.from_pretrained(path)
        model = cls(spec_from_json(meta["spec"]), tok, meta["objectives"])
        model.blip = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
        model.blip.qformer.config._attn_implementation = "eager"
        freeze(model.blip.vision_model)
        extras = load_file(str(path / EXTRAS_FILE))
        model.itg_head.load_state_dict({k[9:]: v for k, v in extras.items() if k.startswith("itg_head.")})
        with torch.no_grad():
            model.temp.copy_(extras["temp"][0])
        return model.eval()

    def load_vision_from(self, vision) -> None:
        self.blip.vision_model.load_state_dict(vision.state_dict())

    def init_qformer_from_bert(self, path: str | Path) -> int:
        """Initialise the Q-Former from a local BERT-style checkpoint (as BLIP-2 does from BERT-base).

        Self-attention and FFN weights go to both the text FFN and the query FFN; cross-attention stays
        random. Returns how many tensors were copied.
        """
        return load_bert_into_qformer(self.blip, path)


def load_bert_into_qformer(blip, path: str | Path) -> int:
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Blip2Error(f"no *.safetensors in {path}", hint="--qformer-init wants a transformers BERT folder")
    src: dict[str, torch.Tensor] = {}
    for f in files:
        src.update(load_file(str(f)))
    src = {k.removeprefix("bert."): v for k, v in src.items()}
    dst = blip.state_dict()
    pairs: list[tuple[str, list[str]]] = [
        ("embeddings.word_embeddings.weight", ["embeddings.word_embeddings.weight"]),
        ("embeddings.position_embeddings.weight", ["embeddings.position_embeddings.weight"]),
        ("embeddings.LayerNorm.weight", ["qformer.layernorm.weight"]),
        ("embeddings.LayerNorm.bias", ["qformer.layernorm.bias"]),
    ]
    for i in range(blip.config.qformer_config.num_hidden_layers):
        s, d = f"encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        for p in ("weight", "bias"):
            for n in ("query", "key", "value"):
                pairs.append((f"{s}attention.self.{n}.{p}", [f"{d}attention.attention.{n}.{p}"]))
            pairs.append((f"{s}attention.output.dense.{p}", [f"{d}attention.output.dense.{p}"]))
            pairs.append((f"{s}attention.output.LayerNorm.{p}", [f"{d}attention.output.LayerNorm.{p}"]))
            # BERT's FFN initialises both the text FFN and the separate query FFN
            pairs.append((f"{s}intermediate.dense.{p}",
                          [f"{d}intermediate.dense.{p}", f"{d}intermediate_query.dense.{p}"]))
            for n in ("dense", "LayerNorm"):
                pairs.append((f"{s}output.{n}.{p}", [f"{d}output.{n}.{p}", f"{d}output_query.{n}.{p}"]))
    copied = 0
    with torch.no_grad():
        for s_key, targets in pairs:
            if s_key not in src:
                continue
            for t in targets:
                if t in dst and dst[t].shape == src[s_key].shape:
                    dst[t].copy_(src[s_key])
                    copied += 1
                elif t in dst and t.startswith("embeddings.") and dst[t].shape[1:] == src[s_key].shape[1:]:
                    n = min(dst[t].shape[0], src[s_key].shape[0])  # vocab / positions may differ
                    dst[t][:n].copy_(src[s_key][:n])
                    copied += 1
    if copied == 0:
        raise Blip2Error(f"{path} holds no BERT weights matching the Q-Former sizes "
                         f"(hidden {blip.config.qformer_config.hidden_size})")
    return copied


# ---------------------------------------------------------------------------------------------- stage 2


class Stage2(nn.Module):
    """Generative learning: Q-Former + projection feeding a frozen OPT (LM loss) or T5 (prefix-LM loss)."""

    def __init__(self, spec: ModelSpec, tokenizer, seed: int = 0):
        super().__init__()
        from transformers import Blip2ForConditionalGeneration

        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        torch.manual_seed(seed)
        self.blip = Blip2ForConditionalGeneration(make_config(spec, tokenizer))
        init_weights(self.blip)
        nn.init.normal_(self.blip.query_tokens, std=0.02)
        freeze(self.blip.vision_model)
        freeze(self.blip.language_model)
        self.image_id = self.blip.config.image_token_index
        self.Q = spec.num_query_tokens
        self.step = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.blip.vision_model.eval()
        self.blip.language_model.eval()
        return self

    def load_parts(self, stage1_dir: str | Path | None, llm, vision=None) -> None:
        """Copy vision + Q-Former + queries from a stage-1 folder (or only ``vision``), and the LLM."""
        from safetensors.torch import load_file

        if stage1_dir is not None:
            files = sorted(Path(stage1_dir).glob("model*.safetensors"))
            if not files:
                raise Blip2Error(f"{stage1_dir} has no model.safetensors", hint="run `blip2-train stage1` first")
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(load_file(str(f)))
            keep = {k: v for k, v in sd.items()
                    if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
            # the text FFNs of the Q-Former are unused in stage 2 (queries only), as in BLIP-2
            own = self.blip.state_dict()
            keep = {k: v for k, v in keep.items() if k in own}
            missing = [k for k in own if k.startswith(("vision_model.", "qformer.", "query_tokens"))
                       and k not in keep]
            if missing:
                raise Blip2Error(f"stage-1 folder {stage1_dir} does not match the stage-2 sizes "
                                 f"(missing {missing[:3]})")
            self.blip.load_state_dict(keep, strict=False)
        elif vision is not None:
            self.blip.vision_model.load_state_dict(vision.state_dict())
        self.blip.language_model.load_state_dict(llm.state_dict())

    def forward(self, pixel_values, input_ids, attention_mask, split=None):
        if self.blip.config.use_decoder_only_language_model:
            return self._opt_loss(pixel_values, input_ids, attention_mask)
        return self._t5_loss(pixel_values, input_ids, attention_mask, split)

    def _opt_loss(self, pixel_values, ids, att):
        # ids = <s> caption </s> (right-padded); LLM input = [image]*Q + ids; the prompt <s> is not a target
        B = ids.shape[0]
        img = torch.full((B, self.Q), self.image_id, dtype=ids.dtype, device=ids.device)
        inp = torch.cat([img, ids], 1)
        mask = torch.cat([torch.ones_like(img), att], 1)
        logits = self.blip(pixel_values=pixel_values, input_ids=inp, attention_mask=mask).logits
        labels = ids.masked_fill(att == 0, -100)
        labels[:, 0] = -100  # prompt
        logits, labels = logits[:, self.Q:-1], labels[:, 1:]
        loss = losses.token_mean(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum"), (labels != -100).sum())
        return loss, {"lm": loss.detach()}

    def _t5_loss(self, pixel_values, ids, att, split):
        """Prefix LM: the first ``split[b]`` words go to the encoder after the queries, the rest is the target."""
        enc_ids, enc_att, dec_labels = losses.prefix_split(ids, att, split, self.tokenizer.eos_token_id,
                                                           self.tokenizer.pad_token_id)
        B = ids.shape[0]
        img = torch.full((B, self.Q), self.image_id, dtype=ids.dtype, device=ids.device)
        inp = torch.cat([img, enc_ids], 1)
        mask = torch.cat([torch.ones_like(img), enc_att], 1)
        dec_in = torch.cat([torch.full((B, 1), self.tokenizer.pad_token_id, dtype=ids.dtype, device=ids.device),
                            dec_labels[:, :-1].clamp(min=0)], 1)
        dec_att = torch.cat([torch.ones(B, 1, dtype=att.dtype, device=att.device),
                             (dec_labels[:, :-1] >= 0).to(att.dtype)], 1)
        logits = self.blip(pixel_values=pixel_values, input_ids=inp, attention_mask=mask,
                           decoder_input_ids=dec_in, decoder_attention_mask=dec_att).logits
        loss = losses.token_mean(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 dec_labels.reshape(-1), ignore_index=-100, reduction="sum"),
                                 (dec_labels != -100).sum())
        return loss, {"prefix_lm": loss.detach()}

    def save(self, path: str | Path, image_processor=None) -> None:

        save_checkpoint(self.blip, self.tokenizer, image_processor or make_image_processor(self.spec), path)
        (Path(path) / TRAINER_FILE).write_text(json.dumps({"stage": 2, "spec": spec_to_json(self.spec)}, indent=2))


@torch.no_grad()
def generate_captions(blip, tokenizer, pixel_values, prompt: str = "", max_new_tokens: int = 12,
                      batch_size: int = 100) -> list[str]:
    """Greedy captions from a ``Blip2ForConditionalGeneration``: input = [image]*Q + tokenizer(prompt)."""
    Q = blip.config.num_query_tokens
    prompt_ids = tokenizer(prompt).input_ids  # OPT: <s> + prompt; T5: prompt + </s> (encoder input)
    device = blip.device
    out: list[str] = []
    for i in range(0, pixel_values.shape[0], batch_size):
        px = pixel_values[i:i + batch_size].to(device)
        ids = torch.tensor([[blip.config.image_token_index] * Q + prompt_ids] * px.shape[0], device=device)
        gen = blip.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if blip.config.use_decoder_only_language_model:
            gen = gen[:, ids.shape[1]:] if gen.shape[1] > ids.shape[1] and (gen[:, :Q] == ids[:, :Q]).all() else gen
        texts = tokenizer.batch_decode(gen.cpu(), skip_special_tokens=True)
        out += [" ".join(t.split()) for t in texts]
    return out


def load_llm(path: str | Path):
    """Load a language-model folder written by :class:`TextTask` (OPT or T5)."""
    from transformers import AutoConfig, OPTForCausalLM, T5ForConditionalGeneration

    cfg = AutoConfig.from_pretrained(path)
    cls = T5ForConditionalGeneration if cfg.model_type == "t5" else OPTForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32)
