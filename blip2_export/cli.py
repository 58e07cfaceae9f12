"""The ``blip2-export`` command line.

Every command reports user errors (bad input, wrong bundle, limits) as one ``error:`` line on
stderr and exits with status 2; no traceback unless ``--debug``. Commands that only run a bundle
(``run``, ``inspect``) never import torch or transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.errors import Blip2Error

EXIT_USER_ERROR = 2


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
    complete.
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
    from runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=False)
    click.echo(f"bundle written: {bundle}")
    for prec, graphs in m.graphs.items():
        for name, g in graphs.items():
            size = (bundle / g.file).stat().st_size + sum(e.bytes for e in g.external_data)
            click.echo(f"  {prec:<5} {name:<16} {g.file:<28} {size / 1e6:9.2f} MB")


# ------------------------------------------------------------------------------------------------
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
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which graphs of the bundle to run (fp16/int8 come from 'blip2-export build').")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]),
              help="ort: ONNX Runtime; trt: TensorRT engines built by 'blip2-export build --backend trt'.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (batch of one).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON lines.")
@_generation_options
def run(bundle, images, prompts, precision, backend, threads, stream, as_json, **gen):
    """Caption images or answer prompts about them with a BUNDLE (no torch needed)."""
    from runtime.pipeline import Blip2Runtime

    opts = {"threads": threads} if backend == "ort" and threads else {}
    rt = Blip2Runtime(bundle, precision=precision, backend=backend, **opts)
    plist = list(prompts) or [""]
    if len(plist) not in (1, len(images)):
        raise Blip2Error(f"{len(plist)} prompts for {len(images)} images: give one prompt, or one per image")
    callback = None
    if stream and len(images) == 1:
        done: list[int] = []

        def callback(step, tokens):
            if tokens[0] is not None:
                done.append(tokens[0])
                text = rt.tokenizer.decode(done)
                click.echo("\r" + text, nl=False)

    results = rt.generate(list(images), plist if len(plist) > 1 else plist[0], stream=callback,
                          **{k: v for k, v in gen.items() if v is not None})
    if callback is not None:
        click.echo()
    for img, r in zip(images, results):
        if as_json:
            click.echo(json.dumps({"image": img, "text": r.text, "token_ids": r.token_ids, "finished": r.finished}))
        elif not stream:
            click.echo(f"{img}: {r.text}" if len(images) > 1 else r.text)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images. Default: 8 deterministic synthetic images.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line (an empty line = plain caption). Default: 3 built-in prompts.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]))
@click.option("--beams", "num_beams", default=1, show_default=True, help="Compare beam search of this width.")
@click.option("--batch", default=1, show_default=True, help="Runtime batch size (eager runs one at a time).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
def parity(checkpoint, bundle, images_dir, prompts_file, precision, backend, num_beams, batch, max_new_tokens,
           report):
    """Compare the eager CHECKPOINT with BUNDLE: per stage and per generation. Exit 1 on failure.

    Thresholds per precision (max abs diff / cosine per stage, token agreement) are in README.
    """
    from blip2_export.parity import DEFAULT_PROMPTS, list_images, run_parity, save_report

    prompts = DEFAULT_PROMPTS
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise Blip2Error(f"prompts file not found: {prompts_file}")
        prompts = tuple(prompts_file.read_text(encoding="utf-8").splitlines())
    images = list_images(images_dir) if images_dir is not None else None
    rep = run_parity(checkpoint, bundle, images=images, prompts=prompts, precision=precision, backend=backend,
                     num_beams=num_beams, batch=batch, max_new_tokens=max_new_tokens, progress=True)
    click.echo(rep.render())
    if report:
        save_report(rep, report)
    if not rep.ok:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip checksum verification.")
def inspect(bundle, no_verify):
    """Validate BUNDLE (manifest + checksums) and print what it holds."""
    from runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=not no_verify)
    f = m.model
    click.echo(f"bundle {bundle}: format v{m.format_version}, {f.family} ({f.llm_type}), "
               f"{f.num_query_tokens} query tokens, context {f.max_context}")
    click.echo("dims: " + ", ".join(f"{k}=[{v.min},{v.opt},{v.max}]" for k, v in m.dims.items()))
    _summary(bundle)
    if not no_verify:
        click.echo("checksums: ok")


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

    run_demo(out, preset=preset, images=list(images), force=force, echo=click.echo)


def main(argv=None) -> int:
    """Entry point: one-line errors, exit 2 for user errors, 130 on Ctrl-C."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="blip2-export", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: nothing half-written was left behind", err=True)
        return 130
    except Blip2Error as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return EXIT_USER_ERROR
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
