"""Flan-T5 (encoder-decoder) BLIP-2 through the same export -> bundle -> runtime -> parity path.

The bundle generates exactly what ``Blip2ForConditionalGeneration.generate`` does (greedy and 3 beams,
batch 1 and 4 with mixed prompt lengths), runs the encoder and the cross-attention k/v once per input,
and works with every feature of the one generation loop (sampling, streaming, limits).
"""

from __future__ import annotations

import numpy as np
import pytest
from bundle_tools import session_dir

from blip2_export.parity import DEFAULT_PROMPTS, list_images, run_parity
from runtime.contract import Family, GraphName
from runtime.errors import LimitError
from runtime.generation import GenerationConfig

IMAGES = list_images(None, count=8)  # 8 images x 3 prompts of different lengths
ORT = {"threads": 1}  # 2 shared CPU cores: one thread each for torch and ORT avoids thrashing
_BUILT: dict = {}


def build_t5(tmp_path_factory, preset: str = "tiny", seed: int = 0):
    """(checkpoint, bundle, loaded model) for a random T5-based BLIP-2, built once per test process."""
    if preset not in _BUILT:
        from blip2_export.export import ExportConfig, export_bundle
        from blip2_export.modelzoo import load_checkpoint, make_random_checkpoint

        root = session_dir(tmp_path_factory, f"t5-{preset}")  # shared with other modules
        ck = make_random_checkpoint(root / "ckpt", preset, seed=seed, llm="t5")
        bundle = export_bundle(ck, root / "bundle", ExportConfig(max_context=128, max_batch=16), progress=False)
        _BUILT[preset] = (ck, bundle, load_checkpoint(ck))
    return _BUILT[preset]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return build_t5(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def eager_cache():
    return {}


@pytest.fixture(scope="module")
def rt(t5):
    from runtime.pipeline import Blip2Runtime

    return Blip2Runtime(t5[1], threads=1)


# -- the bundle ------------------------------------------------------------------------------------
def test_bundle_declares_encoder_decoder_graphs(t5):
    from runtime.manifest import load_manifest

    m = load_manifest(t5[1])
    assert m.family is Family.ENCODER_DECODER and m.model.llm_type == "t5"
    assert set(m.graphs["fp32"]) == {"vision", "qformer", "encoder", "cross_kv", "seq2seq_decoder"}
    for name, rec in m.graphs["fp32"].items():
        exp = m.expected_io(name)
        assert rec.io.input_names() == exp.input_names() and rec.io.output_names() == exp.output_names()
    dec = m.graph(GraphName.SEQ2SEQ_DECODER)
    assert "encoder_hidden_states" not in dec.io.input_names()
    assert [n for n in dec.io.input_names() if n.startswith("cross.")] == [
        f"cross.{i}.{k}" for i in range(m.model.llm_layers) for k in ("key", "value")]
    assert m.model.decoder_start_token_id == 0


def test_decoder_graph_never_recomputes_cross_kv(t5):
    """The decoder graph holds no copy of the cross-attention k/v projections: only cross_kv does."""
    import onnx
    from onnx import numpy_helper

    bundle = t5[1]
    cross = [numpy_helper.to_array(t) for t in onnx.load(str(bundle / "cross_kv.onnx")).graph.initializer]
    dec = [numpy_helper.to_array(t) for t in onnx.load(str(bundle / "seq2seq_decoder.onnx")).graph.initializer]
    assert len(cross) == 2 * t5[2][0].config.text_config.num_decoder_layers
    for w in cross:
        assert not any(d.shape == w.shape and np.array_equal(d, w) for d in dec)
        assert not any(d.shape == w.T.shape and np.array_equal(d, w.T) for d in dec)


# -- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_t5_token_identical(t5, eager_cache, num_beams, batch):
    ck, bundle, loaded = t5
    rep = run_parity(ck, bundle, images=IMAGES, prompts=DEFAULT_PROMPTS, num_beams=num_beams, batch=batch,
                     max_new_tokens=32, model_and_tokenizer=loaded, eager_cache=eager_cache,
                     logits_diff=batch == 1, **ORT)
    assert len(rep.generations) == 24
    assert rep.exact_sequences == 24, rep.render()
    stages = {s.name: s for s in rep.stages}
    assert stages["vision"].max_abs <= 1e-4 and stages["visual_prefix"].max_abs <= 1e-4
    if batch == 1:
        diffs = [g.max_logits_diff for g in rep.generations]
        assert all(d is not None and d < 1e-4 for d in diffs), diffs
    assert rep.ok


def test_tiny_t5_is_not_degenerate(t5, eager_cache):
    """Parity must not hold trivially: outputs differ across images and prompts and are not all padding."""
    ck, bundle, loaded = t5
    rep = run_parity(ck, bundle, images=IMAGES, prompts=DEFAULT_PROMPTS, max_new_tokens=32,
                     model_and_tokenizer=loaded, eager_cache=eager_cache, logits_diff=False, **ORT)
    seqs = [tuple(g.eager_ids) for g in rep.generations]
    assert len(set(seqs)) >= 12
    assert len({tuple(g.eager_ids) for g in rep.generations if g.prompt == ""}) >= 4  # depends on the image
    assert sum(len(set(s)) > 2 for s in seqs) >= 12


def test_batch_equals_unbatched(rt):
    prefix = rt.image_features(IMAGES[:4])
    prompts = ["", "a photo of a cat", "Question: what color is the large square on the left? Answer:", "a"]
    for beams in (1, 3):
        cfg = GenerationConfig(max_new_tokens=16, num_beams=beams)
        together = rt.generate(prefix=prefix, prompts=prompts, config=cfg)
        alone = [rt.generate(prefix=prefix[i:i + 1], prompts=[p], config=cfg)[0] for i, p in enumerate(prompts)]
        assert [g.token_ids for g in together] == [g.token_ids for g in alone]


# -- the runtime: encoder and cross k/v once per input ------------------------------------------------
def test_encoder_and_cross_kv_run_once_per_generate(rt):
    prefix = rt.image_features(IMAGES[:2])
    graphs = {g: rt.graph(g) for g in (GraphName.ENCODER, GraphName.CROSS_KV, GraphName.SEQ2SEQ_DECODER)}
    for beams in (1, 3):
        before = {g: r.calls for g, r in graphs.items()}
        out = rt.generate(prefix=prefix, prompts=["a photo of", ""], max_new_tokens=12, num_beams=beams,
                          min_new_tokens=12)
        calls = {g: graphs[g].calls - before[g] for g in graphs}
        assert calls[GraphName.ENCODER] == 1 and calls[GraphName.CROSS_KV] == 1
        assert calls[GraphName.SEQ2SEQ_DECODER] == 12  # one per new token, none for the encoder side
        assert all(len(g.token_ids) == 12 for g in out)


def test_beam_reorder_reuses_cross_kv(rt):
    """Reordering beams of the same inputs keeps the very same cross k/v arrays (no per-step copy)."""
    from runtime.encoder_decoder import EncoderDecoderModel

    prefix = rt.image_features(IMAGES[:2])
    model = rt.step_model(prefix, [rt.tokenizer.encode("a photo of"), rt.tokenizer.encode("")])
    assert isinstance(model, EncoderDecoderModel)  # the family's step model (runtime.families)
    _, state = model.prefill()
    expanded = model.select(state, np.repeat(np.arange(2), 3))
    assert next(iter(expanded.cross.values())).shape[0] == 6
    reordered = model.select(expanded, np.array([2, 2, 0, 4, 3, 3]))
    assert all(reordered.cross[k] is expanded.cross[k] for k in expanded.cross)
    assert np.array_equal(reordered.source, expanded.source)


# -- the one generation loop, unchanged, for T5 ------------------------------------------------------------
def test_sampling_is_seeded_and_streaming_matches(rt):
    prefix = rt.image_features(IMAGES[:1])
    a = rt.generate(prefix=prefix, prompts=["a photo of"], do_sample=True, top_k=20, temperature=1.5, seed=7,
                    max_new_tokens=16)
    b = rt.generate(prefix=prefix, prompts=["a photo of"], do_sample=True, top_k=20, temperature=1.5, seed=7,
                    max_new_tokens=16)
    assert a[0].token_ids == b[0].token_ids
    greedy = rt.generate(prefix=prefix, prompts=["a photo of"], max_new_tokens=16)
    others = [rt.generate(prefix=prefix, prompts=["a photo of"], do_sample=True, temperature=2.0, seed=s,
                          max_new_tokens=16)[0].token_ids for s in range(4)]
    assert any(o != greedy[0].token_ids for o in others)
    seen: list[int] = []
    res = rt.generate(prefix=prefix, prompts=["a photo of"], max_new_tokens=16,
                      stream=lambda step, toks: seen.append(toks[0]) if toks[0] is not None else None)
    assert seen == res[0].token_ids == greedy[0].token_ids


def test_limits_are_checked_before_running(rt):
    prefix = rt.image_features(IMAGES[:1])
    calls = rt.graph(GraphName.ENCODER).calls
    with pytest.raises(LimitError, match="visual tokens"):
        rt.generate(prefix=prefix, prompts=["a " * 200], max_new_tokens=4)
    with pytest.raises(LimitError, match="decoder positions"):
        rt.generate(prefix=prefix, prompts=["a photo"], max_new_tokens=500)
    assert rt.graph(GraphName.ENCODER).calls == calls


def test_cli_run_on_t5_bundle(t5, tmp_path, capsys):
    import json

    from blip2_export.cli import main

    img = tmp_path / "x.png"
    IMAGES[0].save(img)
    code = main(["run", str(t5[1]), "-i", str(img), "-p", "a photo of", "--max-new-tokens", "6", "--json",
                 "--threads", "1"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 6 and out["token_ids"]


def test_t5_runtime_without_torch(t5, tmp_path, no_torch_env):
    """The encoder-decoder runtime needs no torch or transformers."""
    import subprocess
    import sys

    code = ("import numpy as np; from runtime.pipeline import Blip2Runtime; "
            f"rt = Blip2Runtime({str(t5[1])!r}, threads=1); "
            "print(rt.generate([np.full((40, 40, 3), 120, np.uint8)], 'a photo of', max_new_tokens=5,"
            " num_beams=2)[0].token_ids)")
    env = no_torch_env
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("[")


# -- mid-size ----------------------------------------------------------------------------------------------
def test_int8_t5_graphs_get_weight_engines(t5, tmp_path):
    """int8 T5: the encoder, cross-attention K/V and decoder graphs get MatMulNBits ORT builds (same IO),
    which the runtime loads; they compute what the portable int8 graphs compute, up to activation
    quantization."""
    import shutil

    from engines.build import BuildConfig, build_bundle
    from runtime.manifest import load_manifest
    from runtime.pipeline import Blip2Runtime

    bundle = tmp_path / "bundle"
    shutil.copytree(t5[1], bundle)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(list_images(None, count=3)):
        img.save(calib / f"{i}.png")
    build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=calib), progress=False)
    m = load_manifest(bundle)
    llm = (GraphName.ENCODER, GraphName.CROSS_KV, GraphName.SEQ2SEQ_DECODER)
    for name in llm:
        rec = m.graph(name, "int8")
        assert rec.notes["ort_engine"]["int8_matmul"]["layers"] == rec.notes["linear_layers_quantized"], name
    fast, plain = (Blip2Runtime(bundle, precision="int8", engines=e, threads=1) for e in (True, False))
    assert all(fast.graph(n).facts.engine and fast.graph(n).facts.engine.endswith(".ort.onnx") for n in llm)
    assert not any(plain.graph(n).facts.engine for n in llm)
    feeds = {"inputs_embeds": np.random.default_rng(0).normal(size=(2, 12, m.model.llm_hidden)).astype(np.float32),
             "attention_mask": np.ones((2, 12), np.int64)}
    a, b = (rt.graph(GraphName.ENCODER).run(feeds)["encoder_hidden_states"] for rt in (fast, plain))
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    outs = [rt.generate(IMAGES[:2], "a photo of", max_new_tokens=8) for rt in (fast, plain)]
    assert all(len(o) == 2 and all(r.token_ids for r in o) for o in outs)


@pytest.fixture(scope="module")
def mid_t5(tmp_path_factory):
    return build_t5(tmp_path_factory, "mid", seed=1)


def _mid_parity(mid_t5, images, cache):
    ck, bundle, loaded = mid_t5
    cfg = loaded[0].config
    assert cfg.vision_config.num_hidden_layers >= 6 and cfg.qformer_config.hidden_size >= 384
    assert cfg.text_config.num_layers >= 6 and cfg.text_config.d_model >= 384
    for num_beams in (1, 3):
        for batch in (1, 4):
            rep = run_parity(ck, bundle, images=images, prompts=DEFAULT_PROMPTS, num_beams=num_beams, batch=batch,
                             max_new_tokens=32, model_and_tokenizer=loaded, eager_cache=cache, logits_diff=False,
                             **ORT)
            assert rep.exact_sequences == len(rep.generations) == 3 * len(images), rep.render()


def test_mid_t5_token_identical_two_images(mid_t5):
    """Default run: the mid-size T5 model on 2 images x 3 prompts, greedy and 3 beams, batch 1 and 4."""
    _mid_parity(mid_t5, IMAGES[:2], {})


@pytest.mark.slow
def test_mid_t5_token_identical_eight_images(mid_t5):
    """The full acceptance run on the mid-size model: 8 images x 3 prompts (about a minute more)."""
    _mid_parity(mid_t5, IMAGES, {})
