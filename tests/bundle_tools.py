"""Helpers several test modules use to make bundles and their inputs (imported as ``bundle_tools``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Names of the folders under pytest's temp root that outlive their module (tests/conftest.py removes the
# rest when a module is done).
SESSION_DIRS: set[str] = set()


def session_dir(tmp_path_factory, name: str) -> Path:
    """A temp folder for a session-scoped fixture, or a build cached for the whole test process: kept
    until the session ends."""
    path = tmp_path_factory.mktemp(name)
    SESSION_DIRS.add(path.name)
    return path


def manifest_file_records(m: dict) -> Iterator[dict]:
    """Every file record of a manifest's JSON: its files, graphs, their external data and engines."""
    yield from m["files"].values()
    for graphs in m["graphs"].values():
        for g in graphs.values():
            yield g
            yield from (*g.get("external_data", []), *g.get("engines", []))


def write_calibration_images(folder: Path, n: int = 4) -> Path:
    """The first ``n`` synthetic images of ``blip2_export.parity.list_images`` as PNGs in ``folder``."""
    from blip2_export.parity import list_images

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(list_images(None, count=n)):
        img.save(folder / f"calib-{i}.png")
    return folder
