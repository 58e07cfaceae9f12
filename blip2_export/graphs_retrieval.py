"""torch modules exported as a retrieval bundle's graphs (stage-1 ``Blip2ForImageTextRetrieval``).

Each takes and returns exactly the tensors ``runtime.contract`` declares, calls transformers' own
modules in the order ``Blip2ForImageTextRetrieval.forward`` does, and stays an eager reference:

- ``image_features``: ViT output -> learned queries through the Q-Former -> vision projection, L2-normalised
  (one feature per query; the ITC score of a pair is the max over queries).
- ``text_features``: text ids -> Q-Former text encoder -> text projection of the first ([CLS]) position,
  L2-normalised.
- ``itm``: queries and text through the Q-Former together (queries cross-attend to the image), ITM head
  on the query outputs, averaged over queries -> logits [no match, match].

Text ids never carry the ``<image>`` placeholders some processors put in front; the runtime tokenizes
the caption alone.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageFeaturesGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.vision_projection = model.vision_projection

    def forward(self, image_embeds):
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.qformer(query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
                           encoder_hidden_states=image_embeds, encoder_attention_mask=mask,
                           return_dict=True).last_hidden_state
        feats = self.vision_projection(out.to(self.vision_projection.weight.dtype))
        return nn.functional.normalize(feats, dim=-1).float()


class TextFeaturesGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embeddings = model.embeddings
        self.qformer = model.qformer
        self.text_projection = model.text_projection

    def forward(self, input_ids, attention_mask):
        out = self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                           attention_mask=attention_mask, return_dict=True).last_hidden_state
        feats = self.text_projection(out[:, 0, :].to(self.text_projection.weight.dtype))
        return nn.functional.normalize(feats, dim=-1).float()


class ItmGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.embeddings = model.embeddings
        self.qformer = model.qformer
        self.itm_head = model.itm_head

    def forward(self, image_embeds, input_ids, attention_mask):
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        out = self.qformer(query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries),
                           query_length=queries.shape[1], attention_mask=torch.cat([query_mask, attention_mask], 1),
                           # every image position is real; an all-ones mask would be traced at the
                           # queries+text length and break the queries-only cross-attention
                           encoder_hidden_states=image_embeds, encoder_attention_mask=None,
                           return_dict=True).last_hidden_state
        logits = self.itm_head(out[:, :queries.shape[1], :].to(self.itm_head.weight.dtype))
        return logits.mean(dim=1).float()
