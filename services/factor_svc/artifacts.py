"""Factor sets as artifacts: the engine's format (engine/factor_io.py) published through the store.

The same bytes serve every place a factor set lives:
    factors/{id}/ in the object store   publish_factor_set / read_factor_set
    a local directory (CLI --out/--factors)   save_factors / load_factors
Either way it is the module files plus manifest.json (written last; sha256 and size of every
file, the factor metadata), so a directory downloaded from a server loads as it is, and a
directory uploaded to one is stored unchanged.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.factor_io import check_metadata, from_artifact, to_artifact
from ..engine.factors import FactorSet
from ..errors import NotFoundError
from ..storage import MANIFEST, ArtifactReader, ArtifactStore, ArtifactWriter, LocalStore, open_artifact
from ..system import layout


def publish_factor_set(store: ArtifactStore, prefix: str, factor_set: FactorSet) -> tuple[dict, FactorSet]:
    """Write the module files, then the manifest. Returns the factor metadata and the factor set
    as a reader will load it (storage dtype), so the writer can use it without reading back."""
    metadata, files = to_artifact(factor_set)
    writer = ArtifactWriter(store, prefix)
    for name, tensors in sorted(files.items()):
        writer.add_tensors(name, tensors)
    writer.publish(metadata)
    return metadata, from_artifact(metadata, files.__getitem__)


def factor_reader(store: ArtifactStore, prefix: str, what: str) -> ArtifactReader:
    """The published factor set at `prefix` (NotFoundError naming `what` if none)."""
    reader = open_artifact(store, prefix, what)
    check_metadata(reader.metadata, what)
    return reader


def read_factor_set(store: ArtifactStore, prefix: str, what: str = "factor set") -> FactorSet:
    """Load and verify (sha256 and size of every file) a published factor set."""
    reader = factor_reader(store, prefix, what)
    return from_artifact(reader.metadata, reader.read_tensors, what)


def save_factors(factor_set: FactorSet, directory: str | Path) -> Path:
    """A factor set as a local directory. An earlier factor set there is unpublished first, so
    no reader ever pairs its manifest with the new files."""
    directory = Path(directory)
    (directory / MANIFEST).unlink(missing_ok=True)
    publish_factor_set(LocalStore(directory), "", factor_set)
    return directory


def load_factors(directory: str | Path) -> FactorSet:
    """The factor set in a local directory, every file checked against its manifest."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise NotFoundError(f"no factors at {directory} (missing {MANIFEST})")
    return read_factor_set(LocalStore(directory), "", f"factors at {directory}")


def factors_artifact(store: ArtifactStore, factor_set_id: str) -> ArtifactReader:
    """The published factor set factorSets/{id} (NotFoundError if absent)."""
    return factor_reader(store, layout.factors_prefix(factor_set_id), f"factor set 'factorSets/{factor_set_id}'")


def load_factor_set(store: ArtifactStore, factor_set_id: str) -> FactorSet:
    """The published factor set factorSets/{id}, every file verified."""
    return read_factor_set(store, layout.factors_prefix(factor_set_id), f"factor set 'factorSets/{factor_set_id}'")
