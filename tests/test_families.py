"""The family seam: every family the contract names is registered on both sides (export + parity, and the
runtime's step model), and a model no family claims is refused by name."""

from __future__ import annotations

import pytest

from blip2_export.families import FAMILIES, family_of, load_for_export
from runtime.contract import Family
from runtime.errors import Blip2Error
from runtime.families import runtime_family


def test_every_family_has_an_exporter_and_a_runtime():
    for family in Family:
        assert FAMILIES[family].family is family
        spec = runtime_family(family)
        assert (spec.step_model is None) == (family is Family.RETRIEVAL)  # retrieval ranks, the others generate


def test_a_model_no_family_claims_is_refused_by_name():
    class Config:
        use_decoder_only_language_model = None

    class Blip3ForSomething:
        config = Config()

    with pytest.raises(Blip2Error, match="no registered family exports a Blip3ForSomething"):
        family_of(Blip3ForSomething())


def test_checkpoints_pick_their_family(tiny_checkpoint, tmp_path):
    from blip2_export.modelzoo import make_random_checkpoint, make_random_retrieval_checkpoint

    assert load_for_export(tiny_checkpoint)[0].family is Family.DECODER_ONLY
    t5 = make_random_checkpoint(tmp_path / "t5", "tiny", llm="t5")
    assert load_for_export(t5)[0].family is Family.ENCODER_DECODER
    ret = make_random_retrieval_checkpoint(tmp_path / "ret", "tiny")
    assert load_for_export(ret)[0].family is Family.RETRIEVAL
