"""Reliability 6: the batch and context limits a bundle was exported for are enforced before any graph
runs, with a LimitError that names the flag to raise (``--max-batch``, ``--max-context``); requests
exactly at a limit work."""

from __future__ import annotations

import numpy as np
import pytest

from blip2_export.cli import main
from runtime.contract import GraphName
from runtime.errors import InputError, LimitError
from runtime.pipeline import Blip2Runtime

MAX_BATCH, MAX_CONTEXT = 4, 48
IMG = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def small(tiny_checkpoint, tmp_path_factory):
    """The tiny model exported with --max-batch 4 --max-context 48."""
    from blip2_export.export import ExportConfig, export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("limits") / "b",
                         ExportConfig(max_batch=MAX_BATCH, max_context=MAX_CONTEXT), progress=False)


@pytest.fixture(scope="module")
def rt(small):
    return Blip2Runtime(small)


def _calls(rt) -> dict[str, int]:
    return {g.value: rt.graph(g).calls for g in (GraphName.VISION, GraphName.QFORMER, GraphName.DECODER)}


def test_manifest_records_the_export_flags(rt):
    assert rt.manifest.dims["batch"].max == MAX_BATCH
    assert rt.manifest.model.max_context == MAX_CONTEXT


def test_batch_at_the_limit_works_and_one_more_is_refused_before_any_graph_runs(rt):
    assert len(rt.generate([IMG] * MAX_BATCH, "a photo of", max_new_tokens=2)) == MAX_BATCH
    before = _calls(rt)
    with pytest.raises(LimitError) as e:
        rt.generate([IMG] * (MAX_BATCH + 1), "a photo of", max_new_tokens=2)
    assert f"batch={MAX_BATCH + 1}" in str(e.value) and "--max-batch" in str(e.value)
    assert _calls(rt) == before  # refused up front, not half-way through the vision graph
    with pytest.raises(LimitError, match="--max-batch"):
        rt.image_features([IMG] * (MAX_BATCH + 1))


def test_prompts_over_a_shared_prefix_count_as_batch(rt):
    prefix = rt.image_features([IMG])
    assert len(rt.generate(prompts=["q"] * MAX_BATCH, prefix=prefix, max_new_tokens=2)) == MAX_BATCH
    with pytest.raises(LimitError, match="--max-batch"):
        rt.generate(prompts=["q"] * (MAX_BATCH + 1), prefix=prefix, max_new_tokens=2)
    with pytest.raises(LimitError, match="--max-batch"):
        rt.ask(IMG, ["q"] * (MAX_BATCH + 1), max_new_tokens=2)


@pytest.mark.parametrize("batch,beams", [(1, MAX_BATCH), (2, MAX_BATCH // 2)])
def test_beams_times_batch_at_the_limit_works(rt, batch, beams):
    out = rt.generate([IMG] * batch, "a photo of", max_new_tokens=3, num_beams=beams)
    assert len(out) == batch


@pytest.mark.parametrize("batch,beams", [(1, MAX_BATCH + 1), (2, 3), (MAX_BATCH, 2)])
def test_beams_times_batch_over_the_limit_names_the_flag(rt, batch, beams):
    before = _calls(rt)
    with pytest.raises(LimitError) as e:
        rt.generate([IMG] * batch, "a photo of", max_new_tokens=3, num_beams=beams)
    msg = str(e.value)
    assert f"batch x num_beams={batch * beams}" in msg and "--max-batch" in msg, msg
    assert _calls(rt)["decoder"] == before["decoder"]


def _prompt_of(rt, tokens: int) -> str:
    """A prompt that encodes to exactly ``tokens`` ids (BOS included)."""
    for words in range(tokens + 1):
        p = " ".join(["red"] * words)
        if len(rt.tokenizer.encode(p)) == tokens:
            return p
    raise AssertionError(f"no prompt of {tokens} tokens")


@pytest.mark.parametrize("prompt_tokens", [1, 10, MAX_CONTEXT - 8 - 1])
def test_context_exactly_full_works_and_one_more_position_is_refused(rt, prompt_tokens):
    """visual tokens + prompt tokens + max_new_tokens == max_context runs to the end; +1 is refused."""
    m = rt.manifest.model
    prompt = _prompt_of(rt, prompt_tokens)
    room = MAX_CONTEXT - m.num_query_tokens - prompt_tokens
    out = rt.generate([IMG], prompt, max_new_tokens=room, min_new_tokens=room)  # no early stop: fill it
    assert len(out[0].token_ids) == room
    with pytest.raises(LimitError) as e:
        rt.generate([IMG], prompt, max_new_tokens=room + 1)
    msg = str(e.value)
    assert f"= {MAX_CONTEXT + 1} exceeds the bundle's context of {MAX_CONTEXT}" in msg, msg
    assert "--max-context" in msg and "--max-new-tokens" in msg, msg


def test_full_context_of_the_default_tiny_bundle(tiny_bundle):
    """The session bundle (--max-context 128): a generation that fills every position runs (the last
    positions hit the end of the exported position range without an ONNX Runtime index error)."""
    rt = Blip2Runtime(tiny_bundle)
    m = rt.manifest.model
    room = m.max_context - m.num_query_tokens - len(rt.tokenizer.encode("a photo of"))
    out = rt.generate([IMG], "a photo of", max_new_tokens=room, min_new_tokens=room)
    assert len(out[0].token_ids) == room
    beams = rt.generate([IMG], "a photo of", max_new_tokens=room, min_new_tokens=room, num_beams=2)
    assert len(beams[0].token_ids) == room


def test_one_long_prompt_in_a_batch_refuses_the_batch(rt):
    long = _prompt_of(rt, MAX_CONTEXT)
    with pytest.raises(LimitError, match="--max-context"):
        rt.generate([IMG, IMG], ["a photo of", long], max_new_tokens=2)


def test_no_images_is_an_input_error(rt):
    with pytest.raises(InputError, match="no images"):
        rt.generate([], "a photo of")


def test_cli_names_the_flags(small, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(IMG).save(tmp_path / "x.png")
    code = main(["run", str(small), "--image", str(tmp_path / "x.png"), "--beams", str(MAX_BATCH + 1)])
    err = capsys.readouterr().err
    assert code == 2 and "--max-batch" in err and len(err.strip().splitlines()) == 1, err
    code = main(["run", str(small), "--image", str(tmp_path / "x.png"), "--max-new-tokens", str(MAX_CONTEXT)])
    err = capsys.readouterr().err
    assert code == 2 and "--max-context" in err and len(err.strip().splitlines()) == 1, err


def test_encoder_decoder_limits_name_the_flag(tmp_path):
    """Flan-T5 bundles check the encoder length (visual + prompt tokens) and the decoder positions."""
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "t5-ck", "tiny", seed=0, llm="t5")
    bundle = export_bundle(ck, tmp_path / "t5", ExportConfig(max_context=24, max_batch=2), progress=False)
    rt = Blip2Runtime(bundle)
    m = rt.manifest.model
    ok = _prompt_of(rt, 24 - m.num_query_tokens)
    assert rt.generate([IMG], ok, max_new_tokens=23, min_new_tokens=23)[0].token_ids
    with pytest.raises(LimitError, match="--max-context"):
        rt.generate([IMG], _prompt_of(rt, 24 - m.num_query_tokens + 1), max_new_tokens=2)
    with pytest.raises(LimitError, match="--max-context"):
        rt.generate([IMG], "a", max_new_tokens=24)
    with pytest.raises(LimitError, match="--max-batch"):
        rt.generate([IMG] * 3, "a", max_new_tokens=2)
    with pytest.raises(LimitError, match="--max-batch"):
        rt.generate([IMG], "a", max_new_tokens=2, num_beams=3)
