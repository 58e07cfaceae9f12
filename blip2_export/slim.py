"""A deployment bundle: the files of the precisions an edge box runs, nothing else.

A bundle as built holds every precision it was built for, the fp32 graphs included (what ``build`` and
``parity`` start from). A camera or robot runs one of them, and its eMMC is small: ``blip2-export slim
BUNDLE -o OUT --precision int4`` copies what that precision reads (its graphs, engines and data files,
the tokenizer, the embedding table it reads: its own where it has one, e.g. int4's float16 table) and
writes a manifest listing only those. The result runs like any bundle with ``--precision int4``; it
cannot be built from (no fp32 graphs), which ``build`` says.

Every file is checked against the source manifest's sha256 as it is copied (the bytes written are the
bytes hashed), and the output appears only when complete (a temporary folder renamed into place).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from runtime.bundle_files import BundleFiles, Staging
from runtime.errors import Blip2Error
from runtime.integrity import atomic_write_text
from runtime.manifest import MANIFEST_NAME, Manifest, graph_files, load_manifest


def slim_files(m: Manifest, precisions: Sequence[str]) -> tuple[dict, dict]:
    """(graphs, file roles) of a deployment bundle of ``precisions`` made from manifest ``m``."""
    missing = [p for p in precisions if p not in m.graphs]
    if missing or not precisions:
        raise Blip2Error(f"bundle has no {', '.join(missing) or 'precision given'} graphs "
                         f"(it has: {', '.join(m.precisions())})", hint="pass --precision for each one to keep")
    keep = set(precisions)
    graphs = {p: m.graphs[p] for p in m.precisions() if p in keep}
    own_tables = {f"embed_tokens.{p}" for p in keep}
    files = {role: rec for role, rec in m.files.items()
             if not role.startswith("embed_tokens.") or role in own_tables}
    if "embed_tokens" in files and all(r in files for r in own_tables):
        del files["embed_tokens"]  # every kept precision reads a table of its own
    return graphs, files


def slim_bundle(bundle: str | Path, out: str | Path, precisions: Sequence[str], *, force: bool = False,
                progress: Callable[[str, int], None] | None = None) -> Path:
    """Write the deployment bundle of ``precisions`` of ``bundle`` to ``out``; returns ``out``.

    ``progress(name, bytes)`` is called after each file is copied."""
    bundle, out = Path(bundle), Path(out)
    m = load_manifest(bundle, verify=False)
    graphs, files = slim_files(m, precisions)
    if out.exists() and not force:
        raise Blip2Error(f"{out} already exists", hint="pass --force to replace it")
    if os.path.realpath(out) == os.path.realpath(bundle):
        raise Blip2Error("the deployment bundle must go to a new folder, not over its source")
    names: dict[str, tuple[str, int | None]] = {}
    for rec in files.values():
        names[rec.file] = (rec.sha256, rec.bytes)
    for gs in graphs.values():
        for g in gs.values():
            for name, digest, size in graph_files(g):
                names[name] = (digest, size)
    src = BundleFiles(bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Staging(out.parent) as staging:
        for name, (digest, size) in names.items():
            src.stage(name, digest, size, staging)  # hashed as copied: a mismatch stops here
            if progress is not None:
                progress(name, (staging.path(name)).stat().st_size)
        slim = dataclasses.replace(m, graphs=graphs, files=files,
                                   source={**m.source, "deployment_of": sorted(graphs)})
        slim.validate()
        assert staging.dir is not None
        atomic_write_text(staging.dir / MANIFEST_NAME, slim.dumps())
        os.chmod(staging.dir, 0o755)  # a bundle folder, readable like the one it came from
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.dir.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.dir.rename(out)
    load_manifest(out, verify=True)  # what was written, read back
    return out
