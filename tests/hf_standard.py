"""The way a transformers user runs a BLIP-2 folder, as checks the trainer's outputs must pass.

``Blip2Processor.from_pretrained(dir)(images=..., text=...)`` then ``Blip2ForConditionalGeneration.generate``,
and the pipeline transformers maps BLIP-2 to (``image-text-to-text``); for a stage-1 folder the processor
and ``Blip2ForImageTextRetrieval`` (ITC and ITM). Each check also compares with the ids this project builds
by hand (``[<image>] * num_query_tokens + tokenizer(prompt)``), so a processor that ran but built other
inputs fails too.
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_NEW = 12


def standard_caption(folder: str | Path, image, prompt: str = "") -> str:
    """Caption ``image`` the standard transformers way; assert the pipeline and our own inputs agree."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, pipeline

    from blip2_export.modelzoo import load_checkpoint

    folder = str(folder)
    proc = Blip2Processor.from_pretrained(folder)
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    Q, image_id = model.config.num_query_tokens, model.config.image_token_index
    ids = inputs["input_ids"][0].tolist()
    # the processor's ids are ours: the image placeholders, then the tokenizer's framing of the prompt
    _, tok, _ = load_checkpoint(folder)
    assert ids == [image_id] * Q + tok(prompt).input_ids, (ids, tok(prompt).input_ids)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    if model.config.use_decoder_only_language_model:
        out = out[:, inputs["input_ids"].shape[1]:]
    text = " ".join(proc.batch_decode(out, skip_special_tokens=True)[0].split())
    pipe = pipeline("image-text-to-text", model=folder)
    got = pipe(images=image, text=prompt, max_new_tokens=MAX_NEW)
    assert len(got) == 1
    generated = got[0]["generated_text"]
    if isinstance(generated, str) and prompt:
        generated = generated.removeprefix(prompt)  # the pipeline returns prompt + continuation
    assert " ".join(str(generated).split()) == text, (got, text)
    return text


def standard_retrieval(folder: str | Path, image, texts: list[str]) -> torch.Tensor:
    """ITM probabilities of ``texts`` for ``image`` through Blip2Processor + Blip2ForImageTextRetrieval."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    folder = str(folder)
    proc = Blip2Processor.from_pretrained(folder)
    inputs = proc(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
    model = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
        itc = model(**inputs).logits_per_image
    assert itm.shape == (len(texts), 2) and torch.isfinite(itc).all()
    return itm.softmax(-1)[:, 1]
