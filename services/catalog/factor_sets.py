"""Factor sets: the engine's format (engine/factor_io.py) as artifacts, described by FactorSetInfo.

The same bytes serve every place a factor set lives:
    factors/{id}/ in the object store ("factorSets/{id}")   publish / load / FACTOR_SETS.open
    a local directory (CLI --out/--factors)                 save_factors / load_factors
Either way it is the module files plus manifest.json (written last; sha256 and size of every
file, the factor metadata), so a directory downloaded from a server loads as it is, and a
directory uploaded to one (factor_svc/imports.py) or registered in place (`link`) is stored
unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..engine.factor_io import FORMAT_VERSION, KIND, check_metadata, from_artifact, to_artifact
from ..engine.factors import FactorSet
from ..engine.modules import TrackedModule
from ..errors import NotFoundError
from ..storage import MANIFEST, ArtifactReader, ArtifactStore, ArtifactWriter, LocalStore, Manifest, open_artifact
from .collection import Cache, Collection, reading_metadata
from .links import linkable_manifest


@dataclass(frozen=True)
class FactorModule:
    """One module's entry: its shape (d_out x d_in, plus a bias column), layout and file."""

    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool
    file: str

    def tracked(self, name: str) -> TrackedModule:
        return TrackedModule(name, self.d_in, self.d_out, self.has_bias, self.transposed)


@dataclass(frozen=True)
class FactorSetInfo:
    """A factor set's metadata (engine/factor_io.py writes it): its strategy and Fisher, the model's
    fingerprint, what it was fitted on (sequences, tokens), its modules and their files, and its
    provenance (free-form: the fit's dataset, model path and dtype, config, timings)."""

    id: str  # not in the metadata: the artifact's id
    strategy: str
    fisher: str
    model_fingerprint: str
    n_sequences: int
    n_tokens: int
    storage_dtype: str
    damping_policy: str
    modules: dict[str, FactorModule]
    provenance: dict

    @property
    def name(self) -> str:
        return factor_set_path(self.id)

    @property
    def dataset(self) -> str:
        """The name of the dataset it was fitted on ("" if unknown, e.g. a local fit)."""
        return self.provenance.get("dataset", "")

    @property
    def model_path(self) -> str:
        return self.provenance.get("model_path", "")

    @property
    def model_dtype(self) -> str:
        return self.provenance.get("model_dtype", "")

    @property
    def create_time(self) -> float | None:
        return self.provenance.get("create_time")

    @property
    def coverage(self) -> dict:
        """What its modules cover of the model (engine modules.Coverage.to_dict; {} for a factor
        set fitted before coverage was recorded)."""
        return self.provenance.get("coverage", {})

    def tracked(self) -> dict[str, TrackedModule]:
        """Its modules as the engine tracks them."""
        return {name: module.tracked(name) for name, module in self.modules.items()}

    def files(self, modules: Sequence[str] = ()) -> list[str]:
        """The files of the chosen modules (all if none), in that order; NotFoundError for a module
        it does not have."""
        unknown = [name for name in modules if name not in self.modules]
        if unknown:
            raise NotFoundError(f"factor set has no module {unknown[0]!r}")
        return [self.modules[name].file for name in (list(modules) or list(self.modules))]

    @classmethod
    def from_metadata(cls, metadata: dict, factor_set_id: str, where: str = "factor set") -> FactorSetInfo:
        """PreconditionError unless `metadata` describes factors of the format this code reads."""
        check_metadata(metadata, where)
        with reading_metadata(where):
            return cls(
                id=factor_set_id,
                strategy=metadata["strategy"],
                fisher=metadata["fisher"],
                model_fingerprint=metadata["model_fingerprint"],
                n_sequences=metadata["n_sequences"],
                n_tokens=metadata["n_tokens"],
                storage_dtype=metadata["storage_dtype"],
                damping_policy=metadata["damping_policy"],
                modules={name: FactorModule(**module) for name, module in metadata["modules"].items()},
                provenance=metadata.get("provenance", {}),
            )

    def to_metadata(self) -> dict:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "id"}
        modules = {name: dataclasses.asdict(module) for name, module in self.modules.items()}
        return {"kind": KIND, "format_version": FORMAT_VERSION, **fields, "modules": modules}


def _info(factor_set_id: str, metadata: dict) -> FactorSetInfo:
    return FactorSetInfo.from_metadata(metadata, factor_set_id, FACTOR_SETS.describe(factor_set_id))


FACTOR_SETS: Collection[FactorSetInfo] = Collection("factorSets", "factors/", "factor set", _info)


def factor_set_path(factor_set_id: str) -> str:
    """ "factorSets/{id}" """
    return FACTOR_SETS.path(factor_set_id)


def parse_factor_set_path(name: str, field: str = "name") -> str:
    """The id in "factorSets/{id}" (InputError naming `field` otherwise)."""
    return FACTOR_SETS.parse(name, field)


def factor_set_id(manifest: Manifest) -> str:
    """The id of an imported factor set: a digest of its manifest (its files' digests and its
    metadata), so the same set always gets the same id and an upload of it is idempotent."""
    return hashlib.sha256(manifest.to_bytes()).hexdigest()[:20]


def _write(store: ArtifactStore, prefix: str, factor_set: FactorSet) -> tuple[dict, FactorSet]:
    """Write the module files, then the manifest. Returns the factor metadata and the factor set
    as a reader will load it (storage dtype)."""
    metadata, files = to_artifact(factor_set)
    writer = ArtifactWriter(store, prefix)
    for name, tensors in sorted(files.items()):
        writer.add_tensors(name, tensors)
    writer.publish(metadata)
    return metadata, from_artifact(metadata, files.__getitem__)


def _read(reader: ArtifactReader, what: str) -> FactorSet:
    """Load and verify (sha256 and size of every file) a published factor set."""
    return from_artifact(reader.metadata, reader.read_tensors, what)


def _cache_key(factor_set_id: str) -> tuple:
    """A factor set in a worker's cache."""
    return ("factors", factor_set_id)


def publish_groups(store: ArtifactStore, factor_set_id: str, groups: Iterable[FactorSet]) -> FactorSetInfo:
    """Publish factorSets/{id} from a fit's module groups (each a FactorSet of its modules, model
    order), one group in memory at a time: each group's module files are written as it comes, then
    one manifest of every module (the tokens counted: the largest of the groups', as
    Eigenbases.merged takes them; the effective batch sizes: every group's). Its files are the bytes
    `publish` writes for the joined set; nothing is kept in a cache (that would hold every group)."""
    writer = ArtifactWriter(store, FACTOR_SETS.prefix(factor_set_id))
    metadata, batch_sizes = None, set()
    for group in groups:
        group_metadata, files = to_artifact(group)
        for name, tensors in sorted(files.items()):
            writer.add_tensors(name, tensors)
        batch_sizes |= set(group_metadata["provenance"].get("effective_batch_sizes", ()))
        if metadata is None:
            metadata = group_metadata
        else:
            metadata["modules"].update(group_metadata["modules"])
            metadata["n_tokens"] = max(metadata["n_tokens"], group_metadata["n_tokens"])
    if batch_sizes:
        metadata["provenance"]["effective_batch_sizes"] = sorted(batch_sizes)
    writer.publish(metadata)
    return FactorSetInfo.from_metadata(metadata, factor_set_id)


def publish(
    store: ArtifactStore, factor_set_id: str, factor_set: FactorSet, cache: Cache | None = None
) -> FactorSetInfo:
    """Publish factorSets/{id}. With `cache` (the worker's), the set is kept there as a reader will
    load it, so a job that follows on this worker reads none back."""
    metadata, stored = _write(store, FACTOR_SETS.prefix(factor_set_id), factor_set)
    if cache is not None:
        cache.put(_cache_key(factor_set_id), stored)
    return FactorSetInfo.from_metadata(metadata, factor_set_id)


def load(store: ArtifactStore, factor_set_id: str) -> FactorSet:
    """The published factor set factorSets/{id}, every file verified."""
    published = FACTOR_SETS.open(store, factor_set_id)
    return _read(published.reader, FACTOR_SETS.describe(factor_set_id))


def load_cached(cache: Cache, store: ArtifactStore, factor_set_id: str) -> FactorSet:
    """`load` through the worker's cache (a published factor set never changes)."""
    return cache.get(_cache_key(factor_set_id), lambda: load(store, factor_set_id))


def save_factors(factor_set: FactorSet, directory: str | Path) -> Path:
    """A factor set as a local directory. An earlier factor set there is unpublished first, so
    no reader ever pairs its manifest with the new files."""
    directory = Path(directory)
    (directory / MANIFEST).unlink(missing_ok=True)
    _write(LocalStore(directory), "", factor_set)
    return directory


def load_factors(directory: str | Path) -> FactorSet:
    """The factor set in a local directory, every file checked against its manifest."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise NotFoundError(f"no factors at {directory} (missing {MANIFEST})")
    what = f"factors at {directory}"
    return _read(open_artifact(LocalStore(directory), "", what), what)


def link(store: ArtifactStore, directory: Path) -> FactorSetInfo:
    """Register a local factor directory in place (the embedded system's local store links it;
    nothing is copied, nothing there is ever modified)."""
    manifest = linkable_manifest(
        store,
        directory,
        what="factors",
        noun="a factor set",
        remedy="send it with ImportFactors (influence score --server uploads it) instead",
    )
    info = FactorSetInfo.from_metadata(manifest.metadata, factor_set_id(manifest), f"factors at {directory}")
    store.link_directory(FACTOR_SETS.prefix(info.id), directory)
    return info
