"""The ``blip2-export`` command line.

Every command reports user errors (bad input, wrong bundle, limits) as one ``error:`` line on
stderr and exits with status 2; no traceback unless ``--debug``. Commands that only run a bundle
(``run``, ``inspect``) never import torch or transformers: that is why each command imports what it
runs inside its body (export, parity, bench and evaluate need torch; tests/test_no_torch.py checks the rest).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.errors import Blip2Error
from runtime.precisions import PRECISION_NAMES
from runtime.precisions import help_text as precision_help

EXIT_USER_ERROR = 2


def _echo(message: object = "", *, err: bool = False, nl: bool = True, prefix: str = "", one_line: bool = False):
    """``click.echo`` for everything this CLI prints: text from a bundle, a model or a file name may hold
    terminal escapes (``ESC]0;...BEL`` retitles a terminal), so C0/C1 control characters are replaced
    (keeping line breaks and tabs, or only tabs with ``one_line``)."""
    from runtime.bundle_files import printable

    text = str(message)
    if one_line:
        text = " ".join(text.splitlines())
    lines = text.split("\n")
    _click_echo(prefix + "\n".join("\t".join(printable(p) for p in ln.split("\t")) for ln in lines), err=err, nl=nl)


_click_echo = click.echo


class _Group(click.Group):
    def list_commands(self, ctx):  # keep the order commands were added: the pipeline's order
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="blip2-export")
@click.pass_context
def cli(ctx, debug):
    """Take BLIP-2 models to the edge: export a checkpoint to an ONNX bundle, build engines, run it.

    \b
    Typical flow:
      blip2-export export ./blip2-checkpoint -o ./bundle      # checkpoint -> ONNX bundle
      blip2-export run ./bundle --image cat.jpg               # caption an image
      blip2-export run ./bundle --image cat.jpg --prompt "Question: what is on the table? Answer:"
      blip2-export parity ./blip2-checkpoint ./bundle         # eager vs bundle, exit 1 on failure
      blip2-export demo                                       # everything, on the embedded model
    """
    ctx.obj = {"debug": debug}


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to create. Refused if it exists, unless --force.")
@click.option("--max-batch", default=16, show_default=True,
              help="Largest number of rows (images x beams) the graphs must accept.")
@click.option("--max-context", type=int, default=None,
              help="Total positions (visual tokens + prompt + generated). Default: the LLM's limit.")
@click.option("--max-new-tokens", default=30, show_default=True, help="Default generation length in the manifest.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--external-data-threshold", type=int, default=None,
              help="Bytes of weights above which a graph stores them in one external .data file "
                   "(default 1 GiB; protobuf cannot hold more than 2 GiB).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
def export(checkpoint, out, max_batch, max_context, max_new_tokens, opset, external_data_threshold, force):
    """Export a local BLIP-2 CHECKPOINT folder (transformers layout) to an ONNX bundle.

    Writes vision, Q-Former(+projection) and LLM graphs, the token embedding table, tokenizer and a
    manifest with IO names, dim ranges and sha256 of every file. The bundle appears only when
    complete. The checkpoint decides the graphs: an OPT-style LLM gets one decoder graph; Flan-T5 gets
    encoder, cross_kv and seq2seq_decoder graphs; a stage-1 Blip2ForImageTextRetrieval checkpoint gets
    image_features, text_features and itm graphs (use it with 'blip2-export retrieve').
    """
    from blip2_export.export import DEFAULT_EXTERNAL_DATA_THRESHOLD, ExportConfig, export_bundle

    cfg = ExportConfig(max_batch=max_batch, max_context=max_context, opset=opset, force=force,
                       max_new_tokens=max_new_tokens,
                       external_data_threshold=(DEFAULT_EXTERNAL_DATA_THRESHOLD if external_data_threshold is None
                                                else external_data_threshold))
    cfg.validate()
    path = export_bundle(checkpoint, out, cfg)
    _summary(path)


def _summary(bundle: Path) -> None:
    from runtime.bundle_files import BundleFiles
    from runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=False)  # every name resolves inside the bundle, checked or not
    files = BundleFiles(bundle, verify=False)
    _echo(f"bundle written: {bundle}")
    for prec, graphs in m.graphs.items():
        for name, g in graphs.items():
            size = files.size(g.file) + sum(e.bytes for e in g.external_data)
            _echo(f"  {prec:<5} {name:<16} {g.file:<28} {size / 1e6:9.2f} MB")


# ------------------------------------------------------------------------------------------------
class _Registered(click.Choice):
    """click.Choice over a registry's names, read when the option is parsed (so a backend registered after
    this module was imported is accepted too)."""

    def __init__(self, names):
        self._names = names
        super().__init__([])  # the names are read when needed (help, parsing), not at import

    @property
    def choices(self):
        return tuple(self._names())

    @choices.setter
    def choices(self, value) -> None:  # click sets it in __init__; the registry stays the source
        pass


def _engine_backends() -> tuple[str, ...]:
    """--backend of ``build``: auto and the registered engine builders (engines.engine_builders)."""
    from engines.build import BACKENDS

    return BACKENDS


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", required=True, type=click.Choice(list(PRECISION_NAMES)),
              help=precision_help())
@click.option("--backend", default="auto", show_default=True, type=_Registered(lambda: _engine_backends()),
              help="ort: write <graph>.<precision>.onnx for ONNX Runtime; trt: also build TensorRT engines "
                   "(<graph>.<precision>.plan) for this GPU; auto: trt where TensorRT and a GPU exist, else ort.")
@click.option("--calib-images", type=click.Path(path_type=Path), default=None,
              help="int8, int4: folder of calibration images (a few dozen like the ones the model will see).")
@click.option("--calib-prompts", type=click.Path(path_type=Path), default=None,
              help="int8: text file, one prompt per line (empty line = caption). Default: 4 built-in prompts. "
                   "Retrieval bundles: required, captions like the ones you will rank.")
@click.option("--calib-method", default="percentile", show_default=True,
              type=click.Choice(["minmax", "percentile", "entropy"]),
              help="int8: how activation ranges are taken from calibration data.")
@click.option("--calib-percentile", default=99.99, show_default=True, help="int8 percentile calibration: cut-off.")
@click.option("--calib-limit", default=64, show_default=True, help="int8: use at most this many images.")
@click.option("--int8-tolerance", default=0.05, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="int8, int4: calibrated graphs (vision, Q-Former) keep whole transformer blocks in float, "
                   "from the last block back (at most half of them), until their output error on the "
                   "calibration images is at most this (relative L2; each step is one more quantization "
                   "pass). 0: quantize every linear layer.")
@click.option("--llm-int8", default="weight", show_default=True, type=click.Choice(["weight", "static"]),
              help="int8 LLM graphs: weight-only int8 (faster decode, no int8 KV/attention) or calibrated Q/DQ.")
@click.option("--ort-int8", default="nbits", show_default=True, type=click.Choice(["nbits", "fold"]),
              help="ort, int8 decoder engine: nbits reads the int8 weights (MatMulNBits; activations quantized "
                   "per block of 128 at run time: fastest); fold keeps the graph's exact weight-only arithmetic "
                   "on fp32 copies of the weights (fp32 speed).")
@click.option("--ort-kv-cache", default="int8", show_default=True, type=click.Choice(["int8", "fp32"]),
              help="ort, int8 decoder engine: int8 keeps the KV cache in int8 with per-channel scales taken from "
                   "calibration (a quarter of the cache bytes: decode slows less as the context grows); fp32 "
                   "keeps it exact.")
@click.option("--max-batch", type=int, default=None,
              help="trt: engine profile's largest batch (default: the bundle's).")
@click.option("--max-context", type=int, default=None,
              help="trt: engine profile's largest context in positions (default: the bundle's).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="trt: timing cache file, read before and updated after each build (reuse across builds).")
@click.option("--workspace", "workspace_mb", default=4096, show_default=True, help="trt: builder workspace, MB.")
@click.option("--int4-block", default=128, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="int4: LLM weights per block (one float32 scale each): smaller blocks are more accurate and "
                   "larger (4.25 bits per weight at 128, 5 at 32).")
@click.option("--int4-method", default="gptq", show_default=True, type=click.Choice(["gptq", "rtn"]),
              help="int4: gptq chooses each weight's code with error feedback from the calibration activations "
                   "(needs --calib-images); rtn is plain rounding.")
@click.option("--int4-lm-head", default="int4", show_default=True, type=click.Choice(["int4", "int8", "fp32"]),
              help="int4: the LM head's weight as int4 blocks, per-channel int8, or fp32.")
@click.option("--int4-vision", default="int8", show_default=True, type=click.Choice(["int8", "fp16"]),
              help="int4: vision and Q-Former as calibrated int8 (CPUs) or fp16 (GPUs).")
@click.option("--force", is_flag=True, help="Redo the ONNX transform even if the bundle has this precision.")
def build(bundle, precision, backend, calib_images, calib_prompts, calib_method, calib_percentile, calib_limit,
          int8_tolerance,
          llm_int8, ort_int8, ort_kv_cache, max_batch, max_context, timing_cache, workspace_mb, int4_block,
          int4_method, int4_lm_head, int4_vision, force):
    """Add --precision graphs (and TensorRT engines) to BUNDLE, in place.

    Precision lives in the graph: each fp32 graph becomes <graph>.<precision>.onnx, which ONNX Runtime
    runs and TensorRT builds as a strongly typed network. The manifest records which layers stay in
    higher precision. Check the result with 'blip2-export parity CHECKPOINT BUNDLE --precision ...'.

    \b
    Examples:
      blip2-export build ./bundle --precision fp16
      blip2-export build ./bundle --precision int8 --calib-images ./imgs
      blip2-export build ./bundle --precision int4 --calib-images ./imgs --int4-block 64
      blip2-export build ./bundle --precision fp16 --backend trt --max-batch 4 --max-context 512 \\
          --timing-cache ./cache
      blip2-export run ./bundle --precision int8 --image x.jpg
    """
    from engines.build import BuildConfig, build_bundle

    cfg = BuildConfig(precision=precision, backend=backend, max_batch=max_batch, max_context=max_context,
                      timing_cache=timing_cache, workspace_mb=workspace_mb, calib_images=calib_images,
                      calib_prompts=calib_prompts, calib_method=calib_method, calib_percentile=calib_percentile,
                      calib_limit=calib_limit, int8_tolerance=int8_tolerance, llm_int8=llm_int8, ort_int8=ort_int8,
                      ort_kv_cache=ort_kv_cache, int4_block=int(int4_block), int4_method=int4_method,
                      int4_lm_head=int4_lm_head, int4_vision=int4_vision, force=force)
    cfg.validate()
    report = build_bundle(bundle, cfg, progress=True, echo=_echo)
    _echo(report.render())


# ------------------------------------------------------------------------------------------------
def _backend_options(backend: str, threads: int | None, int8_kernel: str = "auto") -> dict:
    """Keyword options of a runtime's backend from the CLI's --threads / --int8-kernel (those it takes)."""
    from runtime.backends import backend_spec

    takes = backend_spec(backend).options
    given = {"threads": threads or None, "int8_kernel": int8_kernel}
    return {k: v for k, v in given.items() if k in takes and v is not None}


def _backend_option(f):
    """--backend of the commands that run a bundle: the registered runtime backends."""
    from runtime.backends import backend_help, backend_names

    return click.option("--backend", default="ort", show_default=True, type=_Registered(backend_names),
                        help=backend_help() + ".")(f)


def _int8_kernel_option(f):
    from runtime.backends.int8_kernels import INT8_KERNELS

    return click.option(
        "--int8-kernel", default="auto", show_default=True, type=click.Choice(list(INT8_KERNELS)),
        help="int8 on a CPU (ONNX Runtime): the weight form of the calibrated vision/Q-Former graphs. auto: "
             "u8s8 (weights as built) where ORT's u8 x s8 kernels are exact on this CPU (VNNI/AMX), else u8s7 "
             "(weights halved to 7 bits at load: exact on AVX2-only CPUs, which saturate u8s8). "
             "'blip2-export inspect' shows the choice.")(f)


def _generation_options(f):
    opts = [
        click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate (default: manifest)."),
        click.option("--beams", "num_beams", type=int, default=None, help="Beam search width (1 = greedy)."),
        click.option("--sample", "do_sample", is_flag=True, default=None, help="Sample instead of greedy."),
        click.option("--temperature", type=float, default=None, help="Sampling temperature."),
        click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (1.0 = off)."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same output)."),
        click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats."),
        click.option("--min-new-tokens", type=int, default=None, help="Do not stop before this many tokens."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-i", "--image", "images", multiple=True, required=True,
              help="Image file (JPEG/PNG/...). Repeat for a batch.")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="Prompt, e.g. 'Question: what is this? Answer:'. One for all images, or one per image. "
                   "Omit to caption.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(list(PRECISION_NAMES)),
              help="Which graphs of the bundle to run (all but fp32 come from 'blip2-export build').")
@_backend_option
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (batch of one).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON lines.")
@click.option("-v", "--verbose", is_flag=True,
              help="Say on stderr which graph files were loaded and which int8 kernel form this CPU runs.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds the generation may take before it is stopped with an error.")
@_int8_kernel_option
@_generation_options
def run(bundle, images, prompts, precision, backend, threads, stream, as_json, verbose, timeout, int8_kernel, **gen):
    """Caption images or answer prompts about them with a BUNDLE (no torch needed)."""
    from runtime.pipeline import Blip2Runtime

    opts = _backend_options(backend, threads, int8_kernel)
    rt = Blip2Runtime(bundle, precision=precision, backend=backend, timeout=timeout, **opts)
    plist = list(prompts) or [""]
    if len(plist) not in (1, len(images)):
        raise Blip2Error(f"{len(plist)} prompts for {len(images)} images: give one prompt, or one per image")
    callback = None
    beams = gen.get("num_beams") or rt.manifest.generation.num_beams
    streaming = stream and not as_json and len(images) == 1 and beams == 1
    if stream and not streaming:
        _echo("warning: --stream shows one image's greedy or sampled text as it is generated; with "
                   f"{'--json' if as_json else 'several images' if len(images) > 1 else 'beam search'} "
                   "the results are printed when they are complete", err=True)
    if streaming:
        done: list[int] = []
        shown = [""]

        def callback(step, tokens):
            if tokens[0] is None:
                return
            done.append(tokens[0])
            text = rt.tokenizer.decode(done)
            if text.startswith(shown[0]):  # print what is new (a pipe gets the text once, not rewrites)
                _echo(text[len(shown[0]):], nl=False)
                shown[0] = text

    results = rt.generate(list(images), plist if len(plist) > 1 else plist[0], stream=callback,
                          **{k: v for k, v in gen.items() if v is not None})
    if verbose:
        for line in rt.describe_loaded():
            _echo(line, err=True)
    if streaming:
        rest = results[0].text[len(shown[0]):] if results[0].text.startswith(shown[0]) else ""
        _echo(rest)
        return
    for img, r in zip(images, results):
        if as_json:
            _echo(json.dumps({"image": img, "text": r.text, "token_ids": r.token_ids, "finished": r.finished}))
        else:
            _echo(f"{img}: {r.text}" if len(images) > 1 else r.text)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(list(PRECISION_NAMES)),
              help="Which graphs of the bundle to serve.")
@_backend_option
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; there is no authentication).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=8, show_default=True, type=int,
              help="Requests decoded together (KV slots allocated once); 1 serves one request at a time.")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests that may wait for a slot; more are answered 429 with Retry-After.")
@click.option("--timeout", default=120.0, show_default=True, type=float,
              help="Seconds a request may take from arrival to its last token; then 504 and its slot is freed.")
@click.option("--kv-capacity", type=int, default=None,
              help="Positions per KV slot (visual tokens + prompt + max_tokens); default: the bundle's context.")
@click.option("--max-body-mb", default=20.0, show_default=True, type=float, help="Largest request body (413 above).")
@click.option("--admit-window-ms", default=50.0, show_default=True, type=float,
              help="Most a newcomer waits for others to share its vision + prefill batch (it waits at most a "
                   "tenth of one admission's measured cost; 0: admit each at once).")
@click.option("--model-name", default=None, help="The model id clients send (default: the bundle folder's name).")
@_int8_kernel_option
def serve(bundle, precision, backend, threads, host, port, max_batch, max_queue, timeout, kv_capacity, max_body_mb,
          admit_window_ms, model_name, int8_kernel):
    """Serve a BUNDLE over OpenAI's chat-completions API with continuous batching (needs the [serve] extra).

    \b
    POST /v1/chat/completions (image as a data: URL in an image_url part; stream: true for SSE),
    GET /v1/models, /health, /metrics (Prometheus). SIGTERM finishes the requests in flight.
    """
    from runtime.serving.server import ServeConfig
    from runtime.serving.server import serve as run_server

    cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_queue=max_queue, timeout=timeout,
                      max_body_mb=max_body_mb, kv_capacity=kv_capacity, admit_window=admit_window_ms / 1000,
                      model_name=model_name)
    run_server(bundle, cfg, precision=precision, backend=backend, echo=lambda m: _echo(m, err=True),
               **_backend_options(backend, threads, int8_kernel))


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of images (jpg, png, ...) to match against the texts.")
@click.option("--texts", "texts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one caption per line (blank lines skipped).")
@click.option("--text-features", "features_in", type=click.Path(path_type=Path), default=None,
              help="Captions with features saved earlier by --save-text-features (instead of --texts).")
@click.option("--save-text-features", "features_out", type=click.Path(path_type=Path), default=None,
              help="Save the captions' features (.npz) so a fixed caption set is encoded only once.")
@click.option("--rerank-top-k", default=16, show_default=True,
              help="Re-rank the k best ITC candidates of each query with the ITM head (0: ITC only).")
@click.option("--top", default=5, show_default=True, help="Matches to print per query.")
@click.option("--direction", default="i2t", show_default=True, type=click.Choice(["i2t", "t2i", "both"]),
              help="i2t: best texts for each image; t2i: best images for each text.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(list(PRECISION_NAMES)))
@_backend_option
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per query.")
@_int8_kernel_option
def retrieve(bundle, images_dir, texts_file, features_in, features_out, rerank_top_k, top, direction, precision,
             backend, threads, as_json, int8_kernel):
    """Image-text retrieval with a stage-1 BUNDLE (exported from a Blip2ForImageTextRetrieval checkpoint).

    Ranks by ITC similarity (best query feature vs the text's [CLS] feature), then re-ranks the
    --rerank-top-k best with the ITM head (score = ITM match logit + ITC), as in BLIP-2's retrieval
    evaluation. No torch needed.

    \b
      blip2-export retrieve ./itm-bundle --images photos/ --texts captions.txt
      blip2-export retrieve ./itm-bundle --images photos/ --texts captions.txt --save-text-features caps.npz
      blip2-export retrieve ./itm-bundle --images more/ --text-features caps.npz --direction both
    """
    from runtime.preprocess import image_files
    from runtime.retrieval import RetrievalRuntime, format_result, read_texts

    if (texts_file is None) == (features_in is None):
        raise Blip2Error("give the captions with --texts FILE or --text-features FILE.npz (one of them)")
    rt = RetrievalRuntime(bundle, precision=precision, backend=backend,
                          **_backend_options(backend, threads, int8_kernel))
    texts = rt.load_texts(features_in) if features_in is not None else rt.encode_texts(read_texts(texts_file))
    if features_out is not None:
        texts.save(features_out)
    files = image_files(images_dir)
    images = rt.encode_images(files, names=[f.name for f in files])
    dirs = ("i2t", "t2i") if direction == "both" else (direction,)
    result = rt.retrieve(images, texts, rerank_top_k=rerank_top_k, directions=dirs)
    if as_json:
        def rows(matches):
            return [{"index": mt.index, "score": mt.score, "itc": mt.itc, "itm": mt.itm} for mt in matches[:top]]

        for name, matches in zip(images.names, result.i2t):
            _echo(json.dumps({"image": name, "texts": [dict(r, text=texts.texts[r["index"]])
                                                            for r in rows(matches)]}))
        for text, matches in zip(texts.texts, result.t2i):
            _echo(json.dumps({"text": text, "images": [dict(r, image=images.names[r["index"]])
                                                            for r in rows(matches)]}))
        return
    for line in format_result(result, images.names, texts.texts, top=top, direction=direction):
        _echo(line)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images. Default: 8 deterministic synthetic images.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line (an empty line = plain caption). Default: 3 built-in prompts.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(list(PRECISION_NAMES)))
@_backend_option
@click.option("--beams", "num_beams", default=1, show_default=True, help="Compare beam search of this width.")
@click.option("--batch", default=1, show_default=True, help="Runtime batch size (eager runs one at a time).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@click.option("--texts", "texts_file", type=click.Path(path_type=Path), default=None,
              help="Retrieval bundles: captions file, one per line. Default: 10 built-in captions.")
@click.option("--rerank-top-k", default=4, show_default=True,
              help="Retrieval bundles: compare the ITM re-ranking of the k best ITC candidates.")
@_int8_kernel_option
def parity(checkpoint, bundle, images_dir, prompts_file, precision, backend, num_beams, batch, max_new_tokens,
           report, texts_file, rerank_top_k, int8_kernel):
    """Compare the eager CHECKPOINT with BUNDLE: per stage and per generation. Exit 1 on failure.

    Thresholds per precision (max abs diff / cosine per stage, token agreement) are in README.
    For a retrieval bundle (stage-1 model): image/text features, the ITC similarity matrix and ITM
    logits within 1e-4, and identical rankings.
    """
    from blip2_export.parity import DEFAULT_PROMPTS, list_images, run_parity, save_report
    from runtime.contract import Family
    from runtime.manifest import load_manifest

    if load_manifest(bundle, verify=False).family is Family.RETRIEVAL:
        from blip2_export.parity import DEFAULT_CAPTIONS, run_retrieval_parity
        from runtime.retrieval import read_texts

        texts = read_texts(texts_file) if texts_file is not None else DEFAULT_CAPTIONS
        images = list_images(images_dir) if images_dir is not None else None
        rrep = run_retrieval_parity(checkpoint, bundle, images=images, texts=texts, precision=precision,
                                    backend=backend, rerank_top_k=rerank_top_k,
                                    **_backend_options(backend, None, int8_kernel))
        _echo(rrep.render())
        if report:
            save_report(rrep, report)
        if not rrep.ok:
            sys.exit(1)
        return

    prompts = DEFAULT_PROMPTS
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise Blip2Error(f"prompts file not found: {prompts_file}")
        prompts = tuple(prompts_file.read_text(encoding="utf-8").splitlines())
    images = list_images(images_dir) if images_dir is not None else None
    rep = run_parity(checkpoint, bundle, images=images, prompts=prompts, precision=precision, backend=backend,
                     num_beams=num_beams, batch=batch, max_new_tokens=max_new_tokens, progress=True,
                     **_backend_options(backend, None, int8_kernel))
    _echo(rep.render())
    if report:
        save_report(rep, report)
    if not rep.ok:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Folder for the deployment bundle (must not exist, unless --force).")
@click.option("--precision", "precisions", multiple=True, required=True, type=click.Choice(list(PRECISION_NAMES)),
              help="A precision to keep (repeat for several).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
def slim(bundle, out, precisions, force):
    """Copy the files BUNDLE's chosen precisions read into a deployment bundle, nothing else.

    For the device: the full bundle keeps fp32 (what build and parity start from) and every precision
    built; an edge box runs one. Every file is checked against its checksum as it is copied; OUT appears
    only when complete. Run the result with --precision (it has no fp32 graphs, so it cannot be built from).

    \b
    blip2-export slim ./bundle -o ./bundle-int4 --precision int4
    blip2-export run ./bundle-int4 --precision int4 --image cat.jpg
    """
    from blip2_export.slim import slim_bundle

    copied = []
    out = slim_bundle(bundle, out, precisions, force=force, progress=lambda name, n: copied.append(n))
    _echo(f"wrote {out}: {', '.join(precisions)}, {len(copied)} files, {sum(copied) / 1e9:.2f} GB")


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip checksum verification.")
def inspect(bundle, no_verify):
    """Validate BUNDLE (manifest + checksums) and print what it holds."""
    from runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=not no_verify)
    f = m.model
    _echo(f"bundle {bundle}: format v{m.format_version}, {f.family} ({f.llm_type}), "
               f"{f.num_query_tokens} query tokens, context {f.max_context}")
    _echo("dims: " + ", ".join(f"{k}=[{v.min},{v.opt},{v.max}]" for k, v in m.dims.items()))
    _summary(bundle)
    from runtime.graph_check import check_bundle_graphs

    n = check_bundle_graphs(bundle, m, verify=not no_verify)  # external data: only listed, checksummed files
    if not no_verify:
        _echo(f"checksums: ok; {n} graphs walked: external data only from listed files, operators allowed")
    from runtime.backends.int8_kernels import calibrated_int8, choose, cpu_features

    if any(calibrated_int8(g) for gs in m.graphs.values() for g in gs.values()):
        _echo(f"int8 on this CPU ({cpu_features()['class']}): {choose().describe()}; "
              "override with --int8-kernel")


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("blip2-demo"), show_default=True,
              help="Working folder for the demo's checkpoint copy and bundle.")
@click.option("--model", "preset", default="embedded", show_default=True,
              help="'embedded' (the trained demo model shipped with the package) or a random preset: "
                   "tiny, mid, bench.")
@click.option("-i", "--image", "images", multiple=True, help="Images to caption (default: bundled samples).")
@click.option("--force", is_flag=True, help="Rebuild the demo bundle even if it exists.")
def demo(out, preset, images, force):
    """Run the whole pipeline on an embedded default model: export, caption, parity."""
    from blip2_export.demo import run_demo

    run_demo(out, preset=preset, images=list(images), force=force, echo=_echo)


# ------------------------------------------------------------------------------------------------
def _int_list(ctx, param, value):
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backends", default="eager,ort-fp32,ort-fp16,ort-int8", show_default=True,
              help="Comma-separated: eager (transformers, torch fp32), the peers a CPU user tries first on it: "
                   "eager-dynint8 (torch quantize_dynamic on every Linear) and eager-compile (torch.compile of the "
                   "LLM), ort-fp32|fp16|int8 (the bundle on ONNX Runtime; ort-int8@u8u8 etc. for one int8 weight "
                   "form), trt-fp16|... (TensorRT). What cannot run here is skipped with a reason.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_int_list,
              help="Batch sizes, e.g. 1,4: end to end at each, and decode at each context.")
@click.option("--new-tokens", default=32, show_default=True, help="Tokens generated per run (min = max).")
@click.option("--contexts", default="64,256,512", show_default=True, callback=_int_list,
              help="Cached positions at which per-token decode is timed (visual tokens + prompt).")
@click.option("--repeats", default=3, show_default=True, help="Measured runs per backend and batch.")
@click.option("--warmup", default=1, show_default=True, help="Unmeasured runs first.")
@click.option("--decode-steps", default=8, show_default=True, help="Measured decode steps per context point.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ORT alike (default: all cores).")
@click.option("--prompt", default="a photo of", show_default=True, help="Prompt used for every image.")
@click.option("--model-preset", type=click.Choice(["tiny", "mid", "bench"]), default=None,
              help="Build a random model of this preset at MODEL_DIR and export it to BUNDLE first (each only if "
                   "missing). 'bench' is shaped like a real small BLIP-2: ViT-B/16 at 224 px, 12-layer Q-Former, "
                   "OPT-125M-sized LLM; same seed, same weights, so anyone can reproduce the numbers.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("report"), show_default=True,
              help="Folder for report.json, report.md (tables) and report.png (plot).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="cpu: eager in torch fp32, ort-* on the CPU. cuda: eager in fp16 on the GPU (the GPU baseline), "
                   "ort-* on ONNX Runtime's CUDA provider, trt-* TensorRT; roofline from GPU bandwidth.")
@_int8_kernel_option
def bench(model_dir, bundle, backends, batches, new_tokens, contexts, repeats, warmup, decode_steps, threads,
          prompt, model_preset, out, device, int8_kernel):
    """Time the eager MODEL_DIR checkpoint and BUNDLE's backends side by side, on the same inputs.

    \b
    Per stage (preprocess, vision, qformer, prefill, per-token decode, end to end): p50/p90/p99,
    tokens/s, peak memory; decode vs context and batch; a memory-bandwidth roofline per decode step.
    Reproduce the documented numbers (docs/benchmarks.md) with:
      blip2-export bench bench-model bench-bundle --model-preset bench --batch 1,4
    On a GPU:
      blip2-export bench bench-model bench-bundle --device cuda --backends eager,ort-fp16,trt-fp16
    """
    from blip2_export.bench import BenchConfig, build_bench_model, render_markdown, run_bench, write_report

    cfg = BenchConfig(backends=tuple(b.strip() for b in backends.split(",") if b.strip()), batches=batches,
                      new_tokens=new_tokens, contexts=contexts, warmup=warmup, repeats=repeats,
                      decode_steps=decode_steps, threads=threads, prompt=prompt, device=device,
                      int8_kernel=int8_kernel).validate()
    if model_preset is not None:
        need = max(max(contexts) + decode_steps + 2, 64 + new_tokens)
        build_bench_model(model_dir, bundle, model_preset, max_context=-(-need // 64) * 64 + 64,
                          max_batch=max(8, *batches), echo=_echo)
    report = run_bench(model_dir, bundle, cfg, echo=_echo)
    paths = write_report(report, out)
    _echo(render_markdown(report))
    _echo("wrote " + ", ".join(str(p) for p in paths.values()))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Folder with <split>.jsonl lines {\"image\": ..., \"caption\": ...} (the trainer's format).")
@click.option("--split", default="test", show_default=True)
@click.option("--precision", "precisions", multiple=True, default=("fp32",), show_default=True,
              type=click.Choice(list(PRECISION_NAMES)), help="Repeat to compare precisions side by side.")
@click.option("--limit", default=100, show_default=True, help="Items to score (R@1 is among this many pairs).")
@click.option("--prompt", default="", help="Prompt for captioning (generative bundles).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON lines.")
@_int8_kernel_option
def evaluate(bundle, data, split, precisions, limit, prompt, as_json, int8_kernel):
    """Score BUNDLE on a captioned dataset: caption exact match, or retrieval R@1 both ways.

    \b
    Compare a reduced-precision build with fp32 on your own data:
      blip2-export evaluate ./bundle --data ./my-data --precision fp32 --precision int8
    """
    from blip2_export.evaluate import evaluate as run_eval

    base = None
    for prec in precisions:
        q = run_eval(bundle, data, split=split, precision=prec, limit=limit, prompt=prompt, progress=True,
                     int8_kernel=int8_kernel)
        if as_json:
            _echo(json.dumps(q.to_json()))
            continue
        line = q.render()
        score = q.exact_match if q.exact_match is not None else min(q.i2t_r1 or 0.0, q.t2i_r1 or 0.0)
        if base is None:
            base = score
        else:
            line += f"  ({(score - base) * 100:+.1f} points vs {precisions[0]})"
        _echo(line)


def main(argv=None) -> int:
    """Entry point: one-line errors, exit 2 for user errors, 130 on Ctrl-C."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    import warnings

    from runtime.errors import Blip2Warning

    def show(message, category, *_args, **_kw):
        if issubclass(category, Blip2Warning):
            _echo(f"warning: {message}", err=True, one_line=True)
        else:
            shown(message, category, *_args, **_kw)

    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        shown = warnings.showwarning
        warnings.simplefilter("always", Blip2Warning)  # each is raised once where it applies
        warnings.showwarning = show
        return _main(argv, debug)


def _main(argv, debug: bool) -> int:
    try:
        cli.main(args=argv, prog_name="blip2-export", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        _echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        _echo("interrupted: nothing half-written was left behind", err=True)
        return 130
    except Blip2Error as e:
        if debug:
            raise
        _echo(f"error: {e}", err=True, one_line=True)
        return EXIT_USER_ERROR
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
