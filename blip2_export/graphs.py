"""torch modules that are exported as the bundle's graphs, one per ``runtime.contract.GraphName``.

Each wrapper takes and returns exactly the tensors its contract declares, in order, so the
exporter can hand ``contract`` names straight to ``torch.onnx.export``. Every wrapper also stays a
runnable eager reference for parity checks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from runtime.contract import GraphIO


class VisionGraph(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,P,Dv] (ViT last hidden state, post-LayerNorm)."""

    def __init__(self, blip2):
        super().__init__()
        self.vision_model = blip2.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


class QFormerGraph(nn.Module):
    """image_embeds [B,P,Dv] -> visual prefix [B,Q,D_llm]: learned queries, Q-Former, language projection."""

    def __init__(self, blip2):
        super().__init__()
        self.query_tokens = blip2.query_tokens
        self.qformer = blip2.qformer
        self.language_projection = blip2.language_projection

    def forward(self, image_embeds):
        batch = image_embeds.shape[0]
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.qformer(
            query_embeds=self.query_tokens.expand(batch, -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask,
            return_dict=True,
        ).last_hidden_state
        weight = self.language_projection.weight  # a method on torch's dynamic int8 Linear (bench's peer)
        return self.language_projection(out.to(weight.dtype) if isinstance(weight, torch.Tensor) else out)


class DecoderGraph(nn.Module):
    """One step of a decoder-only LLM: inputs_embeds + mask + positions + past KV -> logits + present KV.

    Used for the prefill (seq = prompt length, past = 0) and every decode step (seq = 1).
    """

    def __init__(self, language_model, layers: int):
        super().__init__()
        self.lm = language_model
        self.layers = layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)


def example_inputs(io: GraphIO, sizes: dict[str, int], dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """Random example tensors for ``io`` with symbolic dims taken from ``sizes``.

    int64 inputs get sensible values by name: masks are ones, position_ids/cache_position count up
    from ``past``, ids are small.
    """
    tensors = []
    g = torch.Generator().manual_seed(0)
    for spec in io.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.dims]
        if spec.dtype == "int64":
            if "mask" in spec.name:
                t = torch.ones(shape, dtype=torch.long)
            elif spec.name in ("position_ids", "cache_position"):
                past = sizes.get("past", 0)
                t = torch.arange(past, past + shape[-1], dtype=torch.long).expand(shape).contiguous()
            else:
                t = torch.randint(0, 8, shape, generator=g)
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        tensors.append(t)
    return tuple(tensors)
