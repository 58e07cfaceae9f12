"""Stage-1 and stage-2 folders load with the transformers classes the exporter and users rely on."""

import dataclasses

import pytest
import torch

from trainer.data import vocabulary
from trainer.models import TRAINER_SPEC, Stage1, Stage2, make_tokenizer, tokenize

SPEC = dataclasses.replace(TRAINER_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                           vision_heads=2, vision_ffn=64, qformer_hidden=32, qformer_layers=2, qformer_heads=2,
                           qformer_ffn=64, llm_hidden=32, llm_layers=1, llm_heads=2, llm_ffn=64)
CAPS = ["a small red circle on the left", "two large blue squares at the top"]


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Stage1(SPEC, make_tokenizer(vocabulary(), "qformer")).eval()
    path = tmp_path_factory.mktemp("s1") / "model"
    model.save(path)
    return path, model


def test_stage1_loads_as_blip2_for_image_text_retrieval(stage1_dir):
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    path, model = stage1_dir
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (path / "stage1_extras.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("[DEC]") == 5
    px = torch.randn(2, 3, 32, 32)
    ids, att = tokenize(tok, CAPS)
    Q = hf.config.num_query_tokens
    img_ids = torch.cat([torch.full((2, Q), hf.config.image_token_index), ids], 1)
    img_att = torch.cat([torch.ones(2, Q, dtype=att.dtype), att], 1)
    hf.eval()
    with torch.no_grad():
        itc = hf(pixel_values=px, input_ids=img_ids, attention_mask=img_att).logits_per_image
        itm = hf(pixel_values=px, input_ids=img_ids, attention_mask=img_att,
                 use_image_text_matching_head=True).logits_per_image
        emb = model.image_embeds(px)
        ours_itc = torch.einsum("iqd,td->itq", model.query_features(emb), model.text_features(ids, att)).max(-1).values
        ours_itm = model.itm_logits(emb, ids, att)
    # our training-time Q-Former passes are the transformers inference passes
    assert torch.allclose(itc, ours_itc, atol=1e-5)
    assert torch.allclose(itm, ours_itm, atol=1e-5)
    again = Stage1.load(path)
    assert torch.equal(again.itg_head.dense.weight, model.itg_head.dense.weight)
    assert torch.allclose(again.temp, model.temp)


def test_stage1_losses_run_and_train(stage1_dir):
    _, _ = stage1_dir
    torch.manual_seed(0)
    model = Stage1(SPEC, make_tokenizer(vocabulary(), "qformer"))
    ids, att = tokenize(model.tokenizer, CAPS * 2)
    px = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(15):
        loss, metrics = model(px, ids, att)
        assert set(metrics) == {"itc", "itm", "itg"}
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    assert all(p.grad is None for p in model.blip.vision_model.parameters())  # frozen


def test_stage2_loads_with_modelzoo_and_generates(stage1_dir, tmp_path):
    from transformers import Blip2ForConditionalGeneration, OPTForCausalLM

    from blip2_export.modelzoo import load_checkpoint

    s1_path, s1 = stage1_dir
    tok = make_tokenizer(vocabulary(), "opt")
    model = Stage2(SPEC, tok)
    from blip2_export.modelzoo import make_config

    llm = OPTForCausalLM(make_config(SPEC, tok).text_config)
    model.load_parts(s1_path, llm)
    assert torch.equal(model.blip.query_tokens, s1.blip.query_tokens)
    assert torch.equal(model.blip.language_model.lm_head.weight, llm.lm_head.weight)
    ids, att = tokenize(tok, CAPS)
    loss, _ = model(torch.randn(2, 3, 32, 32), ids, att)
    loss.backward()
    assert model.blip.query_tokens.grad is not None
    assert all(p.grad is None for p in model.blip.language_model.parameters())
    model.save(tmp_path / "s2")
    _, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "s2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    blip, tok2, proc = load_checkpoint(tmp_path / "s2")
    Q = blip.config.num_query_tokens
    prompt = torch.tensor([[blip.config.image_token_index] * Q + tok2("").input_ids])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = {"pixel_values": pixels, "input_ids": prompt, "max_new_tokens": 4, "min_new_tokens": 4,
          "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        out = blip.generate(**kw)
        ref = model.blip.eval().generate(**kw)  # the saved folder generates what the trained model does
    assert out.sequences.shape[1] == prompt.shape[1] + 4 and torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):  # the same logits, not just the same argmax
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert proc.size["height"] == 32


def test_stage2_t5_prefix_lm_loss(stage1_dir):
    from transformers import T5ForConditionalGeneration

    from blip2_export.modelzoo import make_config

    spec = dataclasses.replace(SPEC, llm="t5")
    tok = make_tokenizer(vocabulary(), "t5")
    model = Stage2(spec, tok)
    model.load_parts(stage1_dir[0], T5ForConditionalGeneration(make_config(spec, tok).text_config))
    ids, att = tokenize(tok, CAPS)
    loss, metrics = model(torch.randn(2, 3, 32, 32), ids, att, torch.tensor([0, 3]))
    assert torch.isfinite(loss) and "prefix_lm" in metrics


def test_qformer_initialises_from_a_bert_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    model = Stage1(SPEC, make_tokenizer(vocabulary(), "qformer"))
    n = model.init_qformer_from_bert(tmp_path / "bert")
    layer = model.blip.qformer.encoder.layer[1]
    assert n > 20
    assert torch.equal(layer.attention.attention.query.weight, bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(layer.intermediate_query.dense.weight, bert.encoder.layer[1].intermediate.dense.weight)
    assert torch.equal(layer.intermediate.dense.weight, bert.encoder.layer[1].intermediate.dense.weight)
    assert torch.equal(model.blip.embeddings.word_embeddings.weight[:30], bert.embeddings.word_embeddings.weight)
