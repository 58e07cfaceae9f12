"""fp32 LLM graph -> weight-only int4 graph: 4-bit weights in blocks along K, one scale per block.

On an edge box the LLM's weights are the decode cost (every token reads all of them) and the memory
limit; 4-bit blocks halve int8's bytes. Each constant 2-D weight of a ``MatMul``/``Gemm`` is stored as
symmetric int4 codes ``q`` in [-8, 7] with one float32 scale per block of ``block`` inputs (rows of a
``[K, N]`` MatMul weight), ``w ~= q * scale``; activations, the KV cache, attention and norms stay float.

The portable graph holds each weight as an ``INT4`` initializer behind a blockwise ``DequantizeLinear``
(``block_size``, opset 21): what a strongly typed TensorRT network takes as INT4 weight-only, and what
ONNX Runtime runs as is. The ORT engine build keeps the pairs, so the engine and the portable graph read
the same int4 weights (stored once); the runtime makes each a ``com.microsoft.MatMulNBits`` with
``bits=4`` while it stages the engine for loading (``runtime.backends.nbits``).

How the codes are chosen (``method``):

``rtn``   plain rounding: scale = block max |w| / 7, q = round(w / scale).
``gptq``  error feedback from calibration data, as in GPTQ: the inputs each layer sees while the fp32
          bundle runs over the calibration images and prompts give ``H = X^T X``; weights are rounded one
          input column at a time and each column's rounding error is pushed onto the columns not yet
          rounded, weighted by ``H^-1``, so the layer's *output* on real activations moves least. The
          block scales are taken from the updated weights as each block starts. Same file format.

The LM head (the node computing ``logits``) is int4 too by default (``lm_head="int4"``), or int8 per
output channel (``"int8"``), or left fp32 (``"fp32"``): docs/precision.md measures the choices.

onnx + numpy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.int8 import float_outputs_nodes, quantize_per_channel
from engines.int8 import linear_layers as int8_linear_layers
from engines.onnx_utils import ensure_node_names, gemm_as_matmul, probe_session, toposort
from engines.tensor_store import DataWriter, LinkedFolder, load_lazy, make_tensor, spill, tensor_array
from runtime.backends.nbits import lower_layers, pack_int4, quantized_layers
from runtime.contract import GraphIO
from runtime.errors import Blip2Error

BLOCK_SIZES = (32, 64, 128)  # --int4-block choices: MatMulNBits and TensorRT take powers of two >= 16
DEFAULT_BLOCK = 128
METHODS = ("gptq", "rtn")
LM_HEAD = ("int4", "int8", "fp32")
QMIN, QMAX = -8, 7
SCALE_DIV = 7.0  # block max |w| maps to 7 (symmetric; -8 is reachable only through GPTQ's feedback)
GPTQ_DAMP = 0.01  # fraction of the mean diagonal of H added to it (H may be singular on few samples)
GPTQ_CHUNK = 128  # columns rounded between two lazy updates of the rest of the matrix
OPSET = 21  # blockwise DequantizeLinear and the INT4 type
NBITS_ACCURACY_LEVEL = 4  # MLAS int8-compute kernel for MatMulNBits (activations quantized per block at run time)


@dataclass
class Int4Result:
    model: object  # onnx.ModelProto
    notes: dict = field(default_factory=dict)


# -- the numbers -------------------------------------------------------------------------------------
def block_for(k: int, block: int) -> int | None:
    """The block size used for an input dim ``k``: ``block``, else the largest smaller power of two >= 16
    dividing ``k``; None when none does."""
    b = block
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def quantize_rtn(w_nk: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain rounding of ``w_nk`` [N, K] in blocks of ``block`` along K: (codes int8 [N, K], scales [N, K/block])."""
    n, k = w_nk.shape
    blocks = w_nk.astype(np.float32).reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=2) / SCALE_DIV
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[:, :, None]), QMIN, QMAX).astype(np.int8)
    return q.reshape(n, k), scale.astype(np.float32)


def quantize_gptq(w_nk: np.ndarray, hessian: np.ndarray, block: int, damp: float = GPTQ_DAMP
                  ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of ``w_nk`` [N, K] given ``hessian`` = X^T X [K, K] of the layer's inputs.

    Returns (codes int8 [N, K], scales [N, K/block]) in the same format as :func:`quantize_rtn`."""
    n, k = w_nk.shape
    W = np.array(w_nk, dtype=np.float64)  # copies (one each): a K = 10240 H is 0.84 GB in float64
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    try:
        inv = np.linalg.inv(H)
        del H
        hinv = np.linalg.cholesky(inv).T  # upper U with U^T U = H^-1
        del inv
    except np.linalg.LinAlgError:
        return quantize_rtn(w_nk, block)
    q = np.zeros((n, k), np.int8)
    scales = np.zeros((n, k // block), np.float64)
    chunk = GPTQ_CHUNK if GPTQ_CHUNK % block == 0 and k % GPTQ_CHUNK == 0 else block
    for i1 in range(0, k, chunk):
        i2 = min(i1 + chunk, k)
        w1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                s = np.abs(w1[:, i:i + block]).max(axis=1) / SCALE_DIV
                s[s == 0] = 1.0
                scales[:, col // block] = s
            assert s is not None
            w = w1[:, i]
            qi = np.clip(np.rint(w / s), QMIN, QMAX)
            q[:, col] = qi
            err = (w - qi * s) / h1[i, i]
            w1[:, i:] -= np.outer(err, h1[i, i:])
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scales.astype(np.float32)


def dequantize(q_nk: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    n, k = q_nk.shape
    return (q_nk.reshape(n, k // block, block).astype(np.float32) * scales[:, :, None]).reshape(n, k)


def int4_tensor(name: str, values: np.ndarray):
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4
    t.dims.extend(values.shape)
    t.raw_data = pack_int4(values)
    return t


# -- calibration: the inputs each linear layer sees ----------------------------------------------------
def linear_layers(model, exclude: tuple[str, ...] = ()) -> list[tuple[Any, str, bool]]:
    """(node, weight initializer name, trans_b) of every MatMul/Gemm with a constant 2-D float32 weight:
    :func:`engines.int8.linear_layers` without the Convs."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    return [(nodes[la.node], la.weight, la.op == "Gemm" and la.axis == 0) for la in int8_linear_layers(model, exclude)
            if la.op != "Conv" and len(inits[la.weight].dims) == 2]


HESSIAN_BUDGET = 1 << 30  # bytes of X^T X held at once (float64); more layers -> more passes over the feeds


class InputHessians:
    """``X^T X`` [K, K] (float64) of linear layers' input tensors over the calibration ``feeds``, computed
    by running the fp32 graph ``src`` with those tensors as extra outputs.

    Held a group at a time: asking for a tensor computes the group of consecutive ``inputs`` (graph
    order) it belongs to, whose matrices fit in ``budget`` bytes, and drops the previous group, so a large
    LLM (OPT-2.7B: 32 x 10240^2 for its fc2 layers alone) never holds all of them."""

    def __init__(self, src: str | Path, feeds: list[dict[str, np.ndarray]], inputs: list[tuple[str, int]],
                 budget: int = HESSIAN_BUDGET):
        # src: the fp32 graph, or a weight-only int8 build of it (its layers run as MatMulNBits: the
        # layers' inputs at a quarter of the fp32 weights' memory)
        self.src, self.feeds, self.budget = Path(src), feeds, budget
        self.order = list(dict.fromkeys(inputs))  # (tensor, K), first use order
        self.held: dict[str, np.ndarray] = {}
        self.passes = 0
        self._work: LinkedFolder | None = None
        self._sess = None

    def _session(self):
        if self._sess is None:
            # the graph, read without its weights, with the layers' inputs as outputs, run from a folder
            # of links to its weight files: ONNX Runtime reads them by path (held once)
            self._work = LinkedFolder(self.src)
            folder = self._work.__enter__()
            model = load_lazy(self.src)
            if any(quantized_layers(model).values()):
                _lower_into(model, folder)
            self._sess = probe_session(model, [n for n, _ in self.order], folder,
                                       level="none")  # the tensors as exported
        return self._sess

    def get(self, name: str) -> np.ndarray | None:
        if name in self.held:
            return self.held[name]
        idx = next((i for i, (n, _) in enumerate(self.order) if n == name), None)
        if idx is None:
            return None
        group: list[str] = []
        size = 0
        for n, k in self.order[idx:]:
            if group and size + 8 * k * k > self.budget:
                break
            group.append(n)
            size += 8 * k * k
        self.held = {}
        sess = self._session()
        wanted = {i.name for i in sess.get_inputs()}
        for feed in self.feeds:
            outs = sess.run(group, {k: v for k, v in feed.items() if k in wanted})
            for n, x in zip(group, outs):
                x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
                h = x.T @ x
                self.held[n] = h if n not in self.held else self.held[n] + h
        self.passes += 1
        if self.order[idx + len(group) - 1] == self.order[-1]:
            self._release()  # the last group: the fp32 graph's session is not needed for the rest
        return self.held[name]

    def _release(self) -> None:
        self._sess = None
        if self._work is not None:
            self._work.__exit__(None, None, None)
            self._work = None

    def close(self) -> None:
        self.held = {}
        self._release()


def _lower_into(model, folder: Path) -> None:
    """Make the weight-only int8/int4 layers of ``model`` (read lazily) MatMulNBits, their new weights
    written to a data file in ``folder`` one at a time (:func:`runtime.backends.nbits.lower_layers`)."""
    inits = {t.name: t for t in model.graph.initializer}
    writer = DataWriter(folder / "lowered.data", "lowered.data")
    try:
        lower_layers(model, lambda n: tensor_array(inits[n]) if n in inits else None,
                     lambda a, n: make_tensor(np.ascontiguousarray(a), n, writer))
    finally:
        writer.close()


# -- the transform -------------------------------------------------------------------------------------
def logits_node(model, io: GraphIO) -> str | None:

    nodes = float_outputs_nodes(model, io)
    return nodes[0] if nodes else None


def quantize_int4(src: str | Path, graph: str, io: GraphIO, *, block: int = DEFAULT_BLOCK, method: str = "gptq",
                  lm_head: str = "int4", feeds: list[dict[str, np.ndarray]] | None = None,
                  stats_graph: str | Path | None = None, writer=None) -> Int4Result:
    """Store every constant 2-D weight of a MatMul/Gemm of ``src`` as blockwise int4 (see the module doc).

    ``feeds``: the graph's recorded calibration inputs (``gptq`` needs them). ``stats_graph``: the graph
    run on them for the layers' inputs (default ``src``); a weight-only int8 build of ``src`` runs within
    a quarter of the fp32 weights' memory, its layers as MatMulNBits. ``writer``: where the new weights
    go as they are made (:class:`engines.tensor_store.DataWriter`; held in memory without one)."""
    from onnx import helper, numpy_helper


    if block not in BLOCK_SIZES:
        raise Blip2Error(f"--int4-block {block} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if method not in METHODS:
        raise Blip2Error(f"--int4-method {method!r} is not one of {', '.join(METHODS)}")
    if lm_head not in LM_HEAD:
        raise Blip2Error(f"--int4-lm-head {lm_head!r} is not one of {', '.join(LM_HEAD)}")
    if method == "gptq" and not feeds:
        raise Blip2Error(f"int4 gptq needs calibration inputs for graph {graph!r}", hint="check --calib-images")
    model = load_lazy(src)  # weights stay on disk: each is read, quantized and dropped in turn
    ensure_node_names(model)
    head = logits_node(model, io)
    layers = linear_layers(model)
    inits_by_name = {t.name: t for t in model.graph.initializer}
    k_of = {w: int(inits_by_name[w].dims[1 if t else 0]) for _, w, t in layers}  # MatMul [K, N]; Gemm^T [N, K]
    hess = InputHessians(stats_graph or src, feeds or [], [(n.input[0], k_of[w]) for n, w, _ in layers])
    inits = {t.name: t for t in model.graph.initializer}
    done: set[str] = set()
    new_nodes, new_inits, drop = [], [], set()
    counts = {"int4": 0, "int8": 0, "fp32": 0}
    blocks_used: dict[int, int] = {}
    head_as = None
    err_rtn, err_used = 0.0, 0.0  # output error on the calibration inputs, summed over layers (gptq)
    for node, w, trans_b in layers:
        if w in done:
            continue
        arr = tensor_array(inits[w]).astype(np.float32, copy=False)
        w_nk = arr if trans_b else arr.T
        k = w_nk.shape[1]
        as_ = lm_head if node.name == head else "int4"
        b = block_for(k, block) if as_ == "int4" else None
        if as_ == "int4" and b is None:
            as_ = "int8"  # no block size divides K: per-channel int8 keeps the layer quantized
        if node.name == head:
            head_as = as_
        if as_ == "fp32":
            counts["fp32"] += 1
            continue
        if as_ == "int8":
            axis = 0 if trans_b else 1
            q8, scale = quantize_per_channel(arr, axis)
            new_inits += [make_tensor(q8, w + "__int8", writer), numpy_helper.from_array(scale, w + "__scale"),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), w + "__zero")]
            new_nodes.append(helper.make_node("DequantizeLinear", [w + "__int8", w + "__scale", w + "__zero"], [w],
                                              axis=axis, name=w + "__dequantize"))
        else:
            assert b is not None
            h = hess.get(node.input[0]) if method == "gptq" else None
            if h is not None:
                q, s = quantize_gptq(w_nk, h, b)
                qr, sr = quantize_rtn(w_nk, b)
                err_used += _output_error(w_nk, dequantize(q, s, b), h)
                err_rtn += _output_error(w_nk, dequantize(qr, sr, b), h)
            else:
                q, s = quantize_rtn(w_nk, b)
            if trans_b and gemm_as_matmul(node, w, model.graph.node, new_nodes):
                trans_b = False  # now MatMul(x, W^T) (+ Add): the pair ONNX Runtime fuses on every version
            # [N, K] codes -> the weight's own layout; blocks run along K (axis 0 of [K, N], axis 1 of [N, K])
            qw, sw, axis = (q, s, 1) if trans_b else (q.T, s.T, 0)
            codes = int4_tensor(w + "__int4", np.ascontiguousarray(qw))
            spill(codes, writer)
            new_inits += [codes, make_tensor(np.ascontiguousarray(sw, dtype=np.float32), w + "__scale", writer)]
            new_nodes.append(helper.make_node("DequantizeLinear", [w + "__int4", w + "__scale"], [w], axis=axis,
                                              block_size=b, name=w + "__dequantize"))
            blocks_used[b] = blocks_used.get(b, 0) + 1
        counts[as_] += 1
        drop.add(w)
        done.add(w)
    hess.close()
    kept = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)
    toposort(model)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < OPSET:
            o.version = OPSET
    model.ir_version = max(model.ir_version, 10)
    notes = {
        "transform": "int4",
        "recipe": "weight",
        "weights": f"int4 symmetric, blocks of {block} inputs along K, one float32 scale per block "
                   "(blockwise DequantizeLinear before each MatMul/Gemm)",
        "method": method,
        "block_size": block,
        "block_sizes_used": {str(k): v for k, v in sorted(blocks_used.items())},
        "lm_head": head_as or "none",
        "activations": "float32 (weight-only: the KV cache, attention and norms never see int4)",
        "linear_layers": counts,
    }
    if method == "gptq":
        notes["calibration"] = {"samples": len(feeds or []), "damp": GPTQ_DAMP, "passes": hess.passes,
                                "output_error_vs_rtn": round(err_used / err_rtn, 4) if err_rtn else None}
    return Int4Result(model, notes)


def _output_error(w_nk: np.ndarray, wq_nk: np.ndarray, h: np.ndarray) -> float:
    """sum over rows of (w - wq) H (w - wq)^T: the squared output error on the calibration inputs."""
    d = (w_nk - wq_nk).astype(np.float64)
    return float(np.sum((d @ h) * d))


# -- the ORT engine: MatMulNBits ---------------------------------------------------------------------------
