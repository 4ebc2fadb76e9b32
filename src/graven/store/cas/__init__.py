"""The content store: files by content, directories as Merkle trees, images and names.

The file adapter of the ImageStore port (``graven.store.base``). Layout under ``root``::

    blobs/sha256/ab/cdef...   immutable content named by its sha256 (files, trees, images)
    refs/<name>               the image digest a name points at
    refs/<name>.history       every digest the name pointed at, one a line, newest last
    cache/sha256/ab/cdef...   build step cache: sha256(key) -> small JSON value
    verified/ab/cdef...       stat of a large blob when it last hashed right
    quarantine/<run>/         what ``check(repair=True)`` moved out of the way
    tmp/                      temp files, renamed into place once complete
    locks/                    flock files serializing read-modify-write updates

One concept a module, each a layer of the one class below, so a call costs no
delegation (the store is on the hot path of every build):

    blobs.BlobStore          content by digest, durability, remembered verifications
    trees.TreeStore          tree levels as blobs, remembered parsed; ingest and tree
                             algebra come from graven.store.ingest and .tree_model
    checkouts.CheckoutStore  trees materialized as (read-only) directories
    refs.RefStore            image documents and the names pointing at them
    step_cache.StepCacheStore  the build step cache
    fsck.FsckStore           hash everything, report damage, quarantine it

The blob layout is an OCI layout's ``blobs/sha256`` plus a two-hex fan-out, so the
image engine can export and import blobs without re-hashing; trees
(``graven.store.tree_model``) are the file-level view it turns into reproducible tar
layers.
"""

from __future__ import annotations

from graven.store.cas.checkouts import CheckoutStore
from graven.store.cas.fsck import FsckStore
from graven.store.cas.step_cache import StepCacheStore

__all__ = ["ContentStore"]


class ContentStore(FsckStore, CheckoutStore, StepCacheStore):
    """File-level content-addressed store with Merkle directories, images and names.

    Safe for concurrent use by several processes: objects are immutable and written by
    atomic rename; name updates are serialized with a file lock.
    """
