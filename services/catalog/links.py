"""Registering a directory on the server in place: an artifact a command wrote (a factor set, an
index and its datasets) becomes readable in a local store without a copy (LocalStore.link_directory;
nothing there is ever modified through the store, unless linked writable).

    manifest = linkable_manifest(store, directory, what="factors", noun="a factor set", remedy=...)
                                                     checked, not linked yet
    store.link_directory(FACTOR_SETS.prefix(id), directory)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, IntegrityError, NotFoundError
from ..storage import MANIFEST, ArtifactStore, LocalStore, Manifest
from ..storage.keys import check_key


def linkable_manifest(store: ArtifactStore, directory: Path, *, what: str, noun: str, remedy: str) -> Manifest:
    """The manifest of the artifact directory `directory` (`what` it holds, e.g. "factors"; `noun`
    "a factor set"), checked before it is linked into `store`: InputError unless the store is a
    local directory (`remedy` says what to do instead), NotFoundError without a manifest,
    IntegrityError when a file it lists is missing or has another size."""
    if not isinstance(store, LocalStore):
        raise InputError(
            f"{noun} can be registered by path only when the server's artifact store is a local directory; {remedy}"
        )
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise NotFoundError(f"no {what} at {directory} (missing {MANIFEST})")
    manifest = Manifest.from_bytes((directory / MANIFEST).read_bytes(), f"{directory / MANIFEST}")
    for name, entry in manifest.files.items():
        if name == MANIFEST:
            raise InputError(f"{directory / MANIFEST} lists itself as a file")
        path = directory / check_key(name)  # no '..', nothing hidden: every file lies inside the directory
        if not path.is_file() or path.stat().st_size != entry.size:
            raise IntegrityError(f"{what} at {directory}: {name} is missing or its size differs from the manifest")
    return manifest
