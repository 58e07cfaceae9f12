"""An int8 KV cache: static per-channel scales from calibration, quantized inside GroupQueryAttention."""

from __future__ import annotations

import numpy as np

from engines.ort.graph import PatternError
from runtime.contract import past_name
from runtime.errors import Blip2Error

KV_INT8_MARGIN = 1.0  # int8 KV scales cover this multiple of the largest |key|/|value| calibration saw


def kv_cache_scales(peaks: dict[str, np.ndarray], layers: int, *,
                    margin: float = KV_INT8_MARGIN) -> dict[str, np.ndarray]:
    """Per-channel int8 scales for each layer's cached keys and values.

    ``peaks``: ``{past.{i}.{key,value}: [heads, head_dim]}``, the largest magnitude calibration saw per
    head and channel (``engines.calibration.CalibrationSet.kv_peak``). Each scale covers ``margin``
    times it: keys carry a few large channels, and one scale per tensor would spend the 8 bits on them.
    Returns ``{past name: [heads, 1, head_dim]}`` float32, the layout ``GroupQueryAttention`` takes for
    ``PER_CHANNEL``. Raises when a layer was never seen (nothing to set its scales from).
    """
    need = [past_name(i, k) for i in range(layers) for k in ("key", "value")]
    missing = [n for n in need if n not in peaks]
    if missing:
        raise Blip2Error(f"calibration saw no cached keys/values for {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}: the int8 KV cache has nothing to set its scales "
                         f"from", hint="build with --ort-kv-cache fp32")
    top = max(float(peaks[n].max()) for n in need)
    floor = max(top * 1e-6, 1e-8)  # a channel that stayed at 0 still gets a usable scale
    return {n: (np.maximum(peaks[n], floor) * margin / 127.0).astype(np.float32)[:, None, :] for n in need}


def quantize_kv_cache(model, scales: dict[str, np.ndarray]) -> int:
    """Store the fused decoder's KV cache in int8: ``past.*``/``present.*`` become int8 tensors, and each
    ``GroupQueryAttention`` gets ``kv_cache_bit_width=8`` with per-channel ``k_scale``/``v_scale``
    (``scales`` from :func:`kv_cache_scales`). The kernel quantizes each new key/value as it writes it
    into the cache (rounding, saturating at +-127 * scale) and dequantizes what it reads; queries,
    attention output and everything else stay fp32. A decode step then reads a quarter of the cache
    bytes. Returns the number of layers converted; raises :class:`PatternError` when a layer's
    attention is not a fused node reading ``past.*``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    done = 0
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        k_name, v_name = (gqa.input[3], gqa.input[4]) if len(gqa.input) > 4 else ("", "")
        if k_name not in scales or v_name not in scales:
            raise PatternError(f"{gqa.name}: its cache inputs {k_name!r}, {v_name!r} have no int8 scales")
        inputs = list(gqa.input) + [""] * max(0, 12 - len(gqa.input))
        if any(inputs[12:]):
            raise PatternError(f"{gqa.name} already has inputs past index 11")
        ks, vs = f"{gqa.name}/k_scale", f"{gqa.name}/v_scale"
        graph.initializer.extend([numpy_helper.from_array(scales[k_name], ks),
                                  numpy_helper.from_array(scales[v_name], vs)])
        del gqa.input[:]
        gqa.input.extend(inputs[:12] + [ks, vs])
        gqa.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                              helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                              helper.make_attribute("v_quant_type", "PER_CHANNEL")])
        done += 1
    for v in (*graph.input, *graph.output):
        if v.name.startswith(("past.", "present.")):
            v.type.tensor_type.elem_type = TensorProto.INT8
    return done
