"""The backend seam: registered backends, typed runner facts, and wrappers that keep (or say they leave)
the in-place KV path."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from blip2_export.cli import cli
from engines.calibration import collect
from runtime.backends import (
    KV_CONCAT,
    KV_SHARED,
    BackendSpec,
    RunnerWrapper,
    backend_names,
    create_backend,
    register_backend,
    unregister_backend,
)
from runtime.backends.ort import OrtBackend
from runtime.contract import GraphName
from runtime.errors import Blip2Error
from runtime.pipeline import Blip2Runtime


def _img():
    return np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)


class CountingWrapper(RunnerWrapper):
    def __init__(self, runner):
        super().__init__(runner)
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        return super().run(feeds)


def test_a_wrapper_keeps_the_in_place_cache_path(tiny_bundle):
    plain = Blip2Runtime(tiny_bundle).generate([_img()], ["a photo of"], max_new_tokens=6)[0]
    rt = Blip2Runtime(tiny_bundle)
    w = rt.wrap_graph(GraphName.DECODER, CountingWrapper)
    assert w.facts.kv_cache == KV_SHARED  # the facts of the wrapped engine, not a silent fallback
    before = w.calls
    out = rt.generate([_img()], ["a photo of"], max_new_tokens=6)[0]
    assert out.token_ids == plain.token_ids
    assert w.runs == 0  # every step went through the engine's binding...
    assert w.calls - before == len(out.token_ids)  # ...one bound run per position (prefill + steps)


def test_a_copying_wrapper_sees_every_step_and_gives_the_same_tokens(tiny_bundle):
    plain = Blip2Runtime(tiny_bundle).generate([_img()], ["a photo of"], max_new_tokens=6)[0]
    rt = Blip2Runtime(tiny_bundle)
    w = rt.wrap_graph(GraphName.DECODER, lambda r: CountingWrapper(r).copying())
    assert w.facts.kv_cache == KV_CONCAT and w.runner.facts.kv_cache == KV_SHARED
    out = rt.generate([_img()], ["a photo of"], max_new_tokens=6)[0]
    assert out.token_ids == plain.token_ids
    assert w.runs == len(out.token_ids)


def test_calibration_records_prefill_and_every_decode_step(tiny_bundle, tmp_path):
    from PIL import Image

    Image.fromarray(_img()).save(tmp_path / "a.png")
    cal = collect(tiny_bundle, [tmp_path / "a.png"], ("a photo of",), decode_steps=4)
    decoder = cal.feeds[GraphName.DECODER.value]
    assert [f["inputs_embeds"].shape[1] for f in decoder][1:] == [1, 1, 1]  # prefill, then one position per step
    assert decoder[0]["past.0.key"].shape[2] == 0 and decoder[-1]["past.0.key"].shape[2] > 0


class RenamedOrt(OrtBackend):
    name = "ort-renamed"


def test_a_registered_backend_is_run_and_offered_by_the_cli(tiny_bundle, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(_img()).save(image)
    spec = register_backend(BackendSpec("ort-renamed", "ORT under another name (test)",
                                        f"{__name__}:RenamedOrt", extra="cpu", options=("threads",)))
    try:
        assert "ort-renamed" in backend_names()
        rt = Blip2Runtime(tiny_bundle, backend=spec.name, threads=1)
        assert rt.backend.name == "ort-renamed"
        assert rt.generate([_img()], ["a photo of"], max_new_tokens=4)[0].text is not None
        res = CliRunner().invoke(cli, ["run", str(tiny_bundle), "-i", str(image), "--backend", "ort-renamed",
                                       "--threads", "1", "--max-new-tokens", "3", "-v"])
        assert res.exit_code == 0, res.output
        assert "(ort-renamed, fp32)" in res.output  # -v names the backend each graph runs on
        with pytest.raises(Blip2Error, match="takes no option int8_kernel"):
            create_backend(spec.name, int8_kernel="u8s8")
    finally:
        unregister_backend(spec.name)
    with pytest.raises(Blip2Error, match="unknown backend 'ort-renamed'"):
        create_backend("ort-renamed")


def test_build_backend_auto_takes_the_first_engine_builder_that_can_build_here(monkeypatch):
    from engines.build import BuildConfig
    from engines.engine_builders import ENGINE_BUILDERS, TrtEngineBuilder

    assert set(ENGINE_BUILDERS) >= {"ort", "trt"}
    monkeypatch.setattr(TrtEngineBuilder, "unavailable", lambda self: "no GPU here (test)")
    assert BuildConfig(precision="int8").resolved_backend() == "ort"
    monkeypatch.setattr(TrtEngineBuilder, "unavailable", lambda self: None)
    assert BuildConfig(precision="int8").resolved_backend() == "trt"
    assert BuildConfig(precision="int8", backend="ort").resolved_backend() == "ort"


def test_a_second_backend_under_a_registered_name_is_refused():
    with pytest.raises(ValueError, match="backend 'ort' is registered twice"):
        register_backend(BackendSpec("ort", "another ort", f"{__name__}:RenamedOrt", extra="cpu"))
    assert create_backend("ort").__class__ is OrtBackend  # the registered one still answers
