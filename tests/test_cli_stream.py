"""`blip2-export run --stream`: the streamed text is the result, for one image, a batch and beams."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2_export.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "blip2_export" / "assets" / "sample_images"


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.mark.parametrize("extra", [[], ["--beams", "3"], ["-i", SAMPLES / "sample_1.png"],
                                   ["--sample", "--seed", "3"]], ids=["greedy", "beams", "batch", "sample"])
def test_stream_prints_what_a_plain_run_prints(tiny_bundle, capsys, extra):
    base = ["run", tiny_bundle, "-i", SAMPLES / "sample_0.png", "--max-new-tokens", "6", *extra]
    plain, _ = _run(base, capsys)
    streamed, err = _run([*base, "--stream"], capsys)
    assert plain.strip(), plain  # something to compare
    assert streamed == plain
    one_greedy_row = "--beams" not in extra and "-i" not in extra
    assert ("warning: --stream" in err) != one_greedy_row, err
