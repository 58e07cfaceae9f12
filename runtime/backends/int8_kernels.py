"""int8 matmuls that are exact on the CPU this process runs on (ONNX Runtime's CPU provider).

A calibrated int8 graph (vision, Q-Former) multiplies uint8 activations by int8 weights. ONNX Runtime
(MLAS) has two kinds of x86 kernels for that product:

* with VNNI (AVX512-VNNI, AVX-VNNI; every AMX CPU has it) ``vpdpbusd`` multiplies four byte pairs and
  accumulates them in int32: exact;
* without it (AVX2, AVX512 without VNNI) ``vpmaddubsw`` adds each pair of byte products into an
  *int16*, which saturates: ``255 * 127 * 2 = 64770 > 32767``. The result is silently wrong (14%
  relative error on a random ViT, 0.92 max abs diff at the published BLIP-2 widths).

The graph in the bundle is the same on every machine (a bundle is often built on one CPU and run on
another), so the form of its int8 weights is chosen here, at load, on the machine that runs it:

* :attr:`Int8Kernel.U8S8`: the weights as built (full int8 range). Where ORT's kernel is exact.
* :attr:`Int8Kernel.U8U8`: each int8 weight that feeds such a product is shifted to uint8 (``w + 128``,
  zero point 128): the *same* values, run by ORT's u8 x u8 kernel, which widens to int16 before it
  multiplies and cannot saturate. Bit for bit the u8s8 result of a VNNI CPU, at some speed cost.
* :attr:`Int8Kernel.U8S7`: each such weight is halved, ``round(w / 2)`` (|w| <= 64), with its scale
  doubled, so a pair sum is at most ``255 * 64 * 2 = 32640``: the fast ``vpmaddubsw`` kernel cannot
  saturate. One bit of weight precision is lost (measured in docs/precision.md): opt in for speed.

The files are unchanged; the rewritten graph is handed to ORT from memory. Which forms are exact is
not read from CPU flags but *measured*: :func:`probe` runs ORT's own kernels on this machine once per
process, on operands that saturate a pair-wise int16 sum, each form through the very rewrite the
bundle's graphs get, and compares with the exact result (per operator kind the graphs quantize:
MatMul and Conv). That also covers CPUs a flags table would not know (an ARM Jetson, an emulator, a
future ORT kernel). :func:`cpu_features` names the CPU's relevant features for reports.

onnx + numpy + onnxruntime only (no torch).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from runtime.errors import Blip2Error, require


class Int8Kernel(str, Enum):
    AUTO = "auto"  # the first of u8s8, u8u8, u8s7 whose kernels are exact on this CPU
    U8S8 = "u8s8"  # weights as built
    U8U8 = "u8u8"  # weights shifted to uint8 at load: same values, a kernel that cannot saturate
    U8S7 = "u8s7"  # weights halved into [-64, 64] at load, scales doubled: cannot saturate, 7-bit weights

    @classmethod
    def parse(cls, value: str | Int8Kernel) -> Int8Kernel:
        try:
            return cls(value)
        except ValueError:
            raise Blip2Error(f"unknown int8 kernel {value!r}; choose one of: "
                             f"{', '.join(k.value for k in cls)}") from None


INT8_KERNELS = tuple(k.value for k in Int8Kernel)
X86_ARCHS = ("x86_64", "amd64", "i386", "i686")  # platform.machine() names of x86 CPUs (lower case)
# Operators whose int8 x int8 product goes through ORT's u8 x s8 GEMM when both inputs are quantized.
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
_PROBE_OP = {"MatMul": "MatMul", "Gemm": "MatMul", "Conv": "Conv"}  # Gemm runs the MatMul kernel
REDUCED_MAX = 64  # |w| after halving: 255 * 64 * 2 = 32640 <= 32767


# -- what the CPU is ---------------------------------------------------------------------------------
_X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
# /proc/cpuinfo "CPU part" of ARM cores an edge box may have (Arm Ltd. implementer 0x41)
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
              "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1",
              "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd4f": "Neoverse-V2"}
_ARM_FLAGS = ("asimd", "asimddp", "i8mm", "fphp", "asimdhp", "sve")


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict:
    """``{"arch", "model", "features": [...], "class"}`` of this CPU, from /proc/cpuinfo where there is one.

    ``class`` is a short name for reports: ``x86 AMX``, ``x86 AVX512-VNNI``, ``x86 AVX-VNNI``,
    ``x86 AVX512 (no VNNI)``, ``x86 AVX2 (no VNNI)``, ``arm64 dotprod`` ... (``unknown`` elsewhere).
    """
    arch = platform.machine().lower()
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "cpu part" and not model:
            model = _ARM_PARTS.get(value.strip().lower(), f"ARM part {value.strip()}")
        elif key in ("flags", "features"):
            flags.update(value.split())
    known = _X86_FLAGS + _ARM_FLAGS
    features = [f for f in known if f in flags]
    if arch in X86_ARCHS:
        if "amx_int8" in flags:
            cls = "x86 AMX"
        elif "avx512_vnni" in flags:
            cls = "x86 AVX512-VNNI"
        elif "avx_vnni" in flags:
            cls = "x86 AVX-VNNI"
        elif "avx512bw" in flags:
            cls = "x86 AVX512 (no VNNI)"
        elif "avx2" in flags:
            cls = "x86 AVX2 (no VNNI)"
        else:
            cls = "x86 (no AVX2)"
    elif arch in ("aarch64", "arm64"):
        cls = "arm64 i8mm" if "i8mm" in flags else "arm64 dotprod" if "asimddp" in flags else "arm64"
    else:
        cls = "unknown"
    return {"arch": arch, "model": model or platform.processor() or arch, "features": features, "class": cls}


# -- the weight forms --------------------------------------------------------------------------------
def calibrated_int8(record) -> bool:
    """A graph (manifest ``GraphRecord``) whose int8 products take quantized activations: the graphs whose
    weights take the form :func:`choose` picks."""
    return record.transform_spec.int8_activations


AUTO_ORDER = (Int8Kernel.U8S8, Int8Kernel.U8U8, Int8Kernel.U8S7)  # most faithful/fastest first


def halve_weights(q: np.ndarray) -> np.ndarray:
    """``round(q / 2)`` (halves away from zero) of int8 weights: |result| <= 64 for |q| <= 127."""
    h = np.floor(np.abs(q.astype(np.int16)) / 2 + 0.5) * np.sign(q)
    return np.clip(h, -REDUCED_MAX, REDUCED_MAX).astype(np.int8)


def quantized_weights(model, ops: tuple[str, ...], load_tensor) -> list:
    """The ``DequantizeLinear`` nodes of ``model`` whose int8 weight (an initializer, zero point 0)
    enters a quantized product of an operator in ``ops``: one whose other data input is itself a
    ``DequantizeLinear`` output (a quantized activation: the product runs as u8 x s8 on ORT's CPU
    kernels). Weight-only layers (float activations) are not listed.
    ``load_tensor(TensorProto) -> np.ndarray`` reads an initializer (the caller resolves external data)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    found = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if inits[dq.input[0]].data_type != 3:  # TensorProto.INT8
            continue
        users = consumers.get(dq.output[0], [])
        if not users or any(u.op_type not in ops for u in users):
            continue
        if not all(any(x != dq.output[0] and (p := producer.get(x)) is not None and p.op_type == "DequantizeLinear"
                       for x in u.input[:2]) for u in users):
            continue
        zp_name = dq.input[2] if len(dq.input) > 2 else ""
        if zp_name and (zp_name not in inits or load_tensor(inits[zp_name]).any()):
            continue  # asymmetric weights: not what the builds emit
        found.append(dq)
    return found


def apply_weight_form(model, kernel: Int8Kernel, ops: tuple[str, ...], load_tensor) -> int:
    """Rewrite ``model`` (a ModelProto, in place) so that the weights :func:`quantized_weights` lists are
    in the ``kernel`` form (u8u8 or u8s7; u8s8 changes nothing). Names are kept; u8u8 gives each weight
    a uint8 zero point of its own. Returns the number of weights rewritten. Raises when a weight or
    scale is shared with a layer that is not rewritten (the builds never emit that)."""
    from onnx import numpy_helper

    if kernel in (Int8Kernel.U8S8, Int8Kernel.AUTO):
        return 0
    graph = model.graph
    dqs = quantized_weights(model, ops, load_tensor)
    targets = {dq.input[0] for dq in dqs} | {dq.input[1] for dq in dqs}
    for n in graph.node:  # every reader of a rewritten weight or scale must be rewritten with it
        if n.op_type == "DequantizeLinear" and n not in dqs and {n.input[0], n.input[1]} & targets:
            raise Blip2Error(f"int8 weight or scale {min({n.input[0], n.input[1]} & targets)} is shared "
                             "with a layer the int8 form does not cover",
                             hint="use --int8-kernel u8s8, or rebuild the bundle with this version")
    inits = {t.name: t for t in graph.initializer}
    replaced: set[str] = set()  # int8 zero points u8u8 swaps for uint8 ones
    for dq in dqs:
        w_name, s_name = dq.input[0], dq.input[1]
        w = load_tensor(inits[w_name])
        if kernel is Int8Kernel.U8S7:
            inits[w_name].CopyFrom(numpy_helper.from_array(halve_weights(w), w_name))
            scale = load_tensor(inits[s_name]).astype(np.float32) * 2
            inits[s_name].CopyFrom(numpy_helper.from_array(scale, s_name))
        else:  # U8U8: the same integers, stored with an offset of 128
            inits[w_name].CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), w_name))
            zp_name = f"{w_name}__u8_zero_point"
            shape = load_tensor(inits[s_name]).shape
            graph.initializer.append(numpy_helper.from_array(np.full(shape, 128, np.uint8), zp_name))
            while len(dq.input) < 3:
                dq.input.append("")
            replaced.add(dq.input[2])
            dq.input[2] = zp_name
    unused = replaced - {x for n in graph.node for x in n.input} - {""}
    if unused:
        kept = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(dqs)


# -- what ORT's kernels do on it -----------------------------------------------------------------------
def _probe_model(op: str, quantized_output: bool):
    """A one-product QDQ graph whose integer operands saturate a pair-wise int16 sum: uint8 activations
    (zero point 128, as the ORT int8 builds quantize them) times int8 weights, per-channel scales.

    With ``quantized_output`` the product is followed by a Q/DQ pair, as in the calibrated graphs: ORT
    then fuses it into ``QLinearConv`` / ``QLinearMatMul``. Without it a MatMul becomes
    ``MatMulIntegerToFloat`` (a Conv is not fused at all). Returns (model, input, output scale)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    if op == "Conv":  # a patch embedding: [1, 3, 16, 16] -> [1, 16, 2, 2], 8x8 patches
        x_shape, w = [1, 3, 16, 16], rng.integers(100, 128, (16, 3, 8, 8)).astype(np.int8)
        product = helper.make_node("Conv", ["xd", "wd"], ["y0"], kernel_shape=[8, 8], strides=[8, 8])
        axis = 0
    else:  # [4, 256] x [256, 16]
        x_shape, w = [4, 256], rng.integers(100, 128, (256, 16)).astype(np.int8)
        product = helper.make_node("MatMul", ["xd", "wd"], ["y0"])
        axis = 1
    channels = w.shape[axis]
    w = w * np.where(rng.random(w.shape) < 0.2, -1, 1).astype(np.int8)  # mostly large positive pairs
    x_scale = np.float32(1.0 / 64)
    # activations near the top of the uint8 range (integers ~ +120..127 after the zero point)
    x = rng.uniform(120, 127, x_shape).astype(np.float32) * x_scale
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(channels, 1.0 / 128, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(channels, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis), product]
    y_scale = 0.0
    if quantized_output:  # the output range: 120 x 127 x K / 128 / 64 at most; 1/240 of it a quantum
        k = int(np.prod(w.shape[1:])) if op == "Conv" else w.shape[0]
        y_scale = float(127 * 127 * k / 128 * x_scale / 120)
        inits += [numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
                  numpy_helper.from_array(np.array(128, np.uint8), "yz")]
        nodes += [helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    graph = helper.make_graph(nodes, f"int8_probe_{op}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model, x, y_scale


def _probe_reference(model, op: str, x: np.ndarray) -> np.ndarray:
    """The exact product the probe graph describes, from its (possibly rewritten) initializers."""
    from onnx import numpy_helper

    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_w = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w")
    channels = t["ws"].size
    zp = (t[dq_w.input[2]].astype(np.float64) if len(dq_w.input) > 2 and dq_w.input[2]
          else np.zeros(channels)).reshape(-1)
    xs = float(t["xs"])
    xq = np.clip(np.round(x / xs), -128, 127).astype(np.float64) * xs
    if op == "Conv":
        w = t["w"].astype(np.float64) - zp.reshape(-1, 1, 1, 1)
        w = w * t["ws"].astype(np.float64).reshape(-1, 1, 1, 1)
        c = w.shape[0]
        patches = xq.reshape(1, 3, 2, 8, 2, 8).transpose(0, 2, 4, 1, 3, 5).reshape(4, 192)
        return (patches @ w.reshape(c, 192).T).T.reshape(1, c, 2, 2)
    w = (t["w"].astype(np.float64) - zp) * t["ws"].astype(np.float64)
    return xq @ w


_PROBES = (("MatMul", False), ("MatMul", True), ("Conv", True))


@functools.lru_cache(maxsize=16)
def probe(kernel: Int8Kernel = Int8Kernel.U8S8, providers: tuple[str, ...] = ("CPUExecutionProvider",)
          ) -> dict[str, bool]:
    """Whether ORT's kernels compute the ``kernel`` form's products exactly here, per operator kind
    ("MatMul", "Conv"); once per process. See the module docstring."""
    from onnx import numpy_helper

    ort = require("onnxruntime", "cpu")
    require("onnx", "cpu")
    exact: dict[str, bool] = {}
    for op, quantized_output in _PROBES:
        model, x, y_scale = _probe_model(op, quantized_output)
        apply_weight_form(model, kernel, QUANTIZED_OPS, numpy_helper.to_array)
        want = _probe_reference(model, op, x)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=list(providers))
        got = sess.run(None, {"x": x})[0].astype(np.float64)
        # exact up to the output's own rounding (one quantum); a saturated pair sum is off by far more
        ok = float(np.abs(got - want).max()) <= max(y_scale, 1e-5 * float(np.abs(want).max()))
        exact[op] = exact.get(op, True) and ok
    return exact


@dataclass(frozen=True)
class Int8Choice:
    kernel: Int8Kernel  # u8s8, u8u8 or u8s7 (never auto)
    requested: Int8Kernel
    reason: str
    ops: tuple[str, ...]  # operator types whose weights take the form (empty for u8s8)

    def describe(self) -> str:
        return f"{self.kernel.value} ({self.reason})"


def choose(requested: str | Int8Kernel = Int8Kernel.AUTO,
           providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Int8Choice:
    """The int8 weight form to load on this machine: ``requested`` unless ``auto``; for ``auto``, the
    first of u8s8, u8u8, u8s7 that :func:`probe` finds exact for every operator whose u8s8 product is
    not (u8s8 itself where all are)."""
    req = Int8Kernel.parse(requested)
    flags = f"CPU flags: {cpu_features()['class']}"
    if req is not Int8Kernel.AUTO:
        return Int8Choice(req, req, f"requested; {flags}", () if req is Int8Kernel.U8S8 else QUANTIZED_OPS)
    if tuple(providers) != ("CPUExecutionProvider",):  # GPU providers accumulate in int32
        return Int8Choice(Int8Kernel.U8S8, req, f"{providers[0]}: int32 accumulation", ())
    base = probe(Int8Kernel.U8S8, tuple(providers))
    bad = tuple(op for op in QUANTIZED_OPS if not base[_PROBE_OP[op]])
    if not bad:
        return Int8Choice(Int8Kernel.U8S8, req, f"ONNX Runtime's u8 x s8 kernels are exact here; {flags}", ())
    where = "/".join(sorted({_PROBE_OP[op] for op in bad}))
    for kernel in AUTO_ORDER[1:]:
        result = probe(kernel, tuple(providers))
        if all(result[_PROBE_OP[op]] for op in bad):
            how = ("same values through the u8 x u8 kernel" if kernel is Int8Kernel.U8U8
                   else "weights halved to 7 bits")
            return Int8Choice(kernel, req, f"ONNX Runtime's u8 x s8 {where} kernels saturate here (no VNNI "
                                           f"kernel): {how}; {flags}", bad)
    raise Blip2Error(f"no int8 form is exact with ONNX Runtime {require('onnxruntime', 'cpu').__version__} on "
                     f"this CPU ({flags}): u8 x s8 {where} saturates and so do u8u8 and u8s7",
                     hint="run --precision fp32 here, or a CPU with VNNI")
