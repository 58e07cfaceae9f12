"""ONNX Runtime build of a decoder graph: fused attention and a KV cache updated in place.

The exported decoder (``runtime.contract.decoder_io``) computes attention from primitive ops and
grows its cache by ``Concat`` each step: every step copies the whole cache, and ONNX Runtime's stock
optimizer does not fuse the attention that transformers 5.x exports. This module rewrites each
layer's attention into one ``com.microsoft.GroupQueryAttention`` node, whose CPU and CUDA kernels
write the new keys/values into the cache buffer in place when ``past.*`` and ``present.*`` are bound
to the same memory (ORT IO binding), so a decode step reads the cache once and copies nothing.

The rewritten graph keeps the decoder contract's input and output names; what changes is how the
runtime must feed it (recorded in the manifest, see :data:`KV_SHARED`):

* ``past.{i}.{key,value}`` are buffers ``[batch, heads, capacity, head_dim]`` bound to the same memory
  as ``present.{i}.{key,value}``; row ``b``'s cache occupies positions ``[0, len_b)``
  (sequences are right-aligned to position 0, not left-padded);
* ``attention_mask`` ``[batch, total]`` holds ones at ``[0, len_b)`` for the row's length after this
  call and zeros after it; the graph derives GroupQueryAttention's ``seqlens_k`` and
  ``total_sequence_length`` from it;
* with ``notes["logits"] == "last"``, ``logits`` is ``[batch, 1, vocab]``: each row's newest position
  only (the LM head no longer runs over the whole prompt at prefill);
* with ``notes["kv_dtype"] == "int8"`` (int8 builds, :func:`quantize_kv_cache`), the ``past.*``/``present.*``
  buffers are int8 with per-channel scales inside the graph.

The plain exported graph stays in the bundle as the portable graph (TensorRT builds from it); the
rewritten one is an ORT "engine" of it, built once at export and saved with its checksum.

onnx + numpy only: no torch (``engines/`` never imports it).

The passes live in :mod:`engines.ort` (one module each: ``attention``, ``logits``, ``weights``,
``reshapes``, ``activations``, ``kv_cache``, over the graph view in ``graph``); which passes each engine
kind runs is declared in :mod:`engines.ort.pipelines`. This module is their public face.
"""

from __future__ import annotations

from engines.ort.activations import uint8_activations
from engines.ort.attention import ATTENTION_OP, FuseResult, fuse_decoder_attention
from engines.ort.graph import (
    SHAPE_OPS,
    GraphView,
    PatternError,
    const_ndim,
    const_source,
    const_value,
    prune,
    shape_expr,
    toposort_append,
)
from engines.ort.kv_cache import KV_INT8_MARGIN, kv_cache_scales, quantize_kv_cache
from engines.ort.logits import last_position_logits
from engines.ort.pipelines import (
    PIPELINES,
    WEIGHT_ONLY_GRAPHS,
    EngineContext,
    EnginePass,
    add_ort_engines,
    attach_ort_engine,
    build_decoder_engine,
    build_engine,
    build_qdq_engine,
    build_weights_engine,
    engine_record_fields,
    wants_engine,
)
from engines.ort.reshapes import ROW_OPS, drop_row_reshapes
from engines.ort.weights import INT8_MODES, fold_int8_weights, pack_qkv
from runtime.backends.nbits import NBITS_ACCURACY_LEVEL, NBITS_BLOCK
from runtime.manifest import KV_SHARED

__all__ = ["ATTENTION_OP", "INT8_MODES", "KV_INT8_MARGIN", "KV_SHARED", "NBITS_ACCURACY_LEVEL", "NBITS_BLOCK", "PIPELINES", "ROW_OPS", "SHAPE_OPS", "WEIGHT_ONLY_GRAPHS", "EngineContext", "EnginePass", "FuseResult", "GraphView", "PatternError", "add_ort_engines", "attach_ort_engine", "build_decoder_engine", "build_engine", "build_qdq_engine", "build_weights_engine", "const_ndim", "const_source", "const_value", "drop_row_reshapes", "engine_record_fields", "fold_int8_weights", "fuse_decoder_attention", "kv_cache_scales", "last_position_logits", "pack_qkv", "prune", "quantize_kv_cache", "shape_expr", "toposort_append", "uint8_activations", "wants_engine"]
