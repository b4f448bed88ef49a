"""A collection of published artifacts of one kind, as every service sees it:

    FACTOR_SETS.path("f1")                   "factorSets/f1" (the resource name callers use)
    FACTOR_SETS.parse(name, "factor_set")    "f1", or InputError naming the request field
    FACTOR_SETS.prefix("f1")                 "factors/f1/" (where its files live in the store)
    FACTOR_SETS.open(store, "f1")            Published(id, info, reader); NotFoundError
                                             "factor set 'factorSets/f1' not found"
    FACTOR_SETS.read(store, "f1")            its info alone
    FACTOR_SETS.list(store, after, size)     infos sorted by id after `after`, and whether more follow
    FACTOR_SETS.delete(store, "f1")          unpublished (NotFoundError if absent), then deleted

An artifact's manifest metadata is parsed once, on opening, into the collection's frozen info
type (DatasetInfo, FactorSetInfo, IndexInfo, ResultInfo), whose `to_metadata()` writes the same
JSON back: the stored formats are the ones the info types read.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..errors import InputError, PreconditionError
from ..storage import MANIFEST, ArtifactReader, ArtifactStore, delete_artifact, is_published, open_artifact
from ..wire import RESOURCE_ID

Info = TypeVar("Info")


class Cache(Protocol):
    """What a worker keeps between tasks (system/caches.ArtifactCache): write-once values by key."""

    def get(self, key, load: Callable[[], Any]) -> Any: ...

    def put(self, key, value) -> Any: ...


@contextlib.contextmanager
def reading_metadata(where: str) -> Iterator[None]:
    """Turns a key or type missing from an artifact's metadata into a PreconditionError naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, InputError) as error:
        detail = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise PreconditionError(f"{where} has incomplete metadata ({detail})") from None


@dataclass(frozen=True)
class Published(Generic[Info]):
    """A published artifact: its id, its parsed metadata and a reader of its files (every read
    checked against the manifest)."""

    id: str
    info: Info
    reader: ArtifactReader


@dataclass(frozen=True)
class Collection(Generic[Info]):
    name: str  # the collection in resource names: "factorSets"
    root: str  # where its artifacts live in the store: "factors/"
    noun: str  # what one is called in messages: "factor set"
    # (id, metadata) -> the info; PreconditionError if the metadata is not of this collection
    parse_info: Callable[[str, dict], Info]

    def path(self, resource_id: str) -> str:
        """The resource name "{collection}/{id}"."""
        return f"{self.name}/{resource_id}"

    def parse(self, name: str, field: str = "name") -> str:
        """The id in the resource name `name`, or an InputError naming the request field."""
        match = re.fullmatch(f"{re.escape(self.name)}/({RESOURCE_ID})", name or "")
        if not match:
            raise InputError(f"{field} must look like '{self.name}/ID', got {name!r}", field=field)
        return match.group(1)

    def prefix(self, resource_id: str) -> str:
        """The store prefix of the artifact (ending in "/")."""
        return f"{self.root}{resource_id}/"

    def prefix_of(self, name: str) -> str:
        """The store prefix of the artifact a resource name of this collection names, "" for any
        other name (an operation's target: what a job that ends without success leaves behind)."""
        try:
            return self.prefix(self.parse(name))
        except InputError:
            return ""

    def describe(self, resource_id: str) -> str:
        return f"{self.noun} '{self.path(resource_id)}'"

    def exists(self, store: ArtifactStore, resource_id: str) -> bool:
        """Whether it is published (its manifest exists)."""
        return is_published(store, self.prefix(resource_id))

    def open(self, store: ArtifactStore, resource_id: str) -> Published[Info]:
        """The published artifact (NotFoundError if absent; PreconditionError if its metadata is
        not of this collection)."""
        reader = open_artifact(store, self.prefix(resource_id), self.describe(resource_id))
        return Published(resource_id, self.parse_info(resource_id, reader.metadata), reader)

    def read(self, store: ArtifactStore, resource_id: str) -> Info:
        return self.open(store, resource_id).info

    def list(self, store: ArtifactStore, after: str, size: int) -> tuple[list[Info], bool]:
        """Up to `size` infos of the published artifacts whose ids follow `after`, sorted by id, and
        whether more follow (artifacts created or deleted meanwhile neither repeat nor shift one)."""
        found = {
            key[len(self.root) :].split("/", 1)[0] for key in store.list(self.root) if key.endswith("/" + MANIFEST)
        }
        following = sorted(resource_id for resource_id in found if resource_id > after)
        return [self.read(store, resource_id) for resource_id in following[:size]], len(following) > size

    def delete(self, store: ArtifactStore, resource_id: str) -> None:
        """Unpublish (manifest first: no reader sees half an artifact), then delete every file.
        NotFoundError if it is not published."""
        self.open(store, resource_id)
        delete_artifact(store, self.prefix(resource_id))
