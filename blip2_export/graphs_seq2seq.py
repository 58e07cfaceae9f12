"""torch modules exported as an encoder-decoder (Flan-T5) LLM's graphs: encoder, cross_kv, seq2seq_decoder.

Each takes and returns exactly the tensors ``runtime.contract`` declares for it, in order, and each
stays a runnable eager reference. They call transformers' own T5 modules, so what they compute is
what ``Blip2ForConditionalGeneration.generate`` computes:

- ``encoder``: [visual prefix ; prompt embeddings] + mask -> encoder hidden states (T5 stack + final norm).
- ``cross_kv``: encoder hidden states -> every decoder layer's cross-attention keys and values, the
  ``k``/``v`` projections T5 applies once and caches (``EncoderDecoderCache.is_updated``).
- ``seq2seq_decoder``: new decoder positions against the self-attention cache; the cross-attention
  cache is handed in already filled and marked updated, so T5 reuses it and never projects the
  encoder output again.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache


def t5_cross_attention(lm, layer: int):
    """The ``T5Attention`` of decoder block ``layer`` that attends to the encoder output."""
    return lm.decoder.block[layer].layer[1].EncDecAttention


class EncoderGraph(nn.Module):
    """inputs_embeds [B,S,D] + attention_mask [B,S] -> encoder_hidden_states [B,S,D]."""

    def __init__(self, t5):
        super().__init__()
        self.encoder = t5.get_encoder()

    def forward(self, inputs_embeds, attention_mask):
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            return_dict=True).last_hidden_state


class CrossKVGraph(nn.Module):
    """encoder_hidden_states [B,S,D] -> cross.{i}.key / cross.{i}.value [B,heads,S,d_kv] per decoder layer."""

    def __init__(self, t5, layers: int):
        super().__init__()
        self.attn = nn.ModuleList([t5_cross_attention(t5, i) for i in range(layers)])

    def forward(self, encoder_hidden_states):
        out = []
        b, s = encoder_hidden_states.shape[:2]
        for a in self.attn:
            shape = (b, s, a.n_heads, a.key_value_proj_dim)
            out.append(a.k(encoder_hidden_states).view(shape).transpose(1, 2))
            out.append(a.v(encoder_hidden_states).view(shape).transpose(1, 2))
        return tuple(out)


class Seq2SeqDecoderGraph(nn.Module):
    """decoder_inputs_embeds + encoder_attention_mask + past self KV + cross KV -> logits + present self KV."""

    def __init__(self, t5, layers: int):
        super().__init__()
        self.lm = t5
        self.layers = layers

    def forward(self, decoder_inputs_embeds, encoder_attention_mask, *kv):
        n = 2 * self.layers
        past, cross = kv[:n], kv[n:]
        self_cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        cross_cache = DynamicCache(ddp_cache_data=[(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)])
        cache = EncoderDecoderCache(self_cache, cross_cache)
        for i in range(self.layers):
            cache.is_updated[i] = True  # cross k/v are given: T5Attention must reuse them, not recompute
        # T5 needs encoder states only for their shape (the cross-attention mask); their values are
        # never read because every layer's cross cache is marked updated.
        b, s = cross[0].shape[0], cross[0].shape[2]
        placeholder = decoder_inputs_embeds.new_zeros((b, s, decoder_inputs_embeds.shape[-1]))
        out = self.lm(
            encoder_outputs=(placeholder,),
            attention_mask=encoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = []
        for layer in out.past_key_values.self_attention_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)


def decoder_embeddings(t5) -> torch.Tensor:
    """The table the T5 decoder embeds its input ids with (shared with the encoder in every T5 we know)."""
    return t5.get_decoder().embed_tokens.weight
