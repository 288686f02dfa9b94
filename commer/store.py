"""Durable user profiles: an embedded SQLite database of running sums and per-document compressions.

Per ``(tenant, user)`` the store keeps the running sum (float64) and count of the user's document compressions, so
the profile's mean soft prompt is one row away and adding or removing a document is O(1) database work whatever the
number of documents. Each document keeps its own compression (float32), the SHA-256 of its text and the text itself:
removing it subtracts exactly what was added, re-adding it is a no-op, and ``rebuild`` can re-compress everything
when the model changes.

Every stored vector is tagged with the fingerprint of the model that produced it (``commer.checkpoint.
model_fingerprint``). A store opened with another fingerprint refuses to serve those vectors until ``rebuild``.

The store is SQLite only: callers pass compressions in (``commer.serving.add_texts`` plans, compresses and commits in
one call), and document ids follow ``commer.serving.document_ids``.

>>> store = ProfileStore("profiles.db", fingerprint, personalizer.shape)
>>> add_texts(store, personalizer, "acme", "alice", ["I run every morning."])
>>> personalizer.generate([store.get_profile("acme", "alice")], ["Plan my weekend."])
"""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from commer.checkpoint import model_fingerprint
from commer.errors import CommerError
from commer.merge import ProfileState
from commer.serving import AddedDocuments, Personalizer, document_ids

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT NOT NULL,
    compression BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (tenant, user, doc_id)
);
"""


class StoreError(CommerError):
    """Base class of the store's errors."""


class UnknownUserError(StoreError, KeyError):
    """No profile exists for this (tenant, user)."""

    def __init__(self, tenant: str, user: str) -> None:
        super().__init__(f"unknown user {user!r} (tenant {tenant!r}): add a document to create the profile")
        self.tenant, self.user = tenant, user

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownDocumentError(StoreError, KeyError):
    """The user has no document with this id."""

    def __init__(self, tenant: str, user: str, doc_id: str) -> None:
        super().__init__(f"user {user!r} (tenant {tenant!r}) has no document {doc_id!r}")
        self.tenant, self.user, self.doc_id = tenant, user, doc_id

    def __str__(self) -> str:
        return str(self.args[0])


class DocumentConflictError(StoreError, ValueError):
    """A document id is already used by a document with a different text."""


class CorruptProfileError(StoreError):
    """A stored profile or compression cannot be read back (a damaged row)."""


class StaleProfileError(StoreError):
    """The profile's vectors were computed by another model than the one this store was opened with."""

    def __init__(self, tenant: str, user: str, stored: str, current: str) -> None:
        super().__init__(
            f"the profile of user {user!r} (tenant {tenant!r}) was computed by model {stored}, but this store serves "
            f"model {current}: its vectors are not comparable. Re-compress the stored documents with "
            "`commer profile rebuild` (or ProfileStore.rebuild(personalizer))"
        )
        self.tenant, self.user, self.stored, self.current = tenant, user, stored, current


@dataclass(frozen=True)
class DocumentInfo:
    """One stored document, without its compression."""

    id: str
    sha256: str
    chars: int
    fingerprint: str
    added_at: float


@dataclass(frozen=True)
class UserInfo:
    """A profile's header: its size and the model its vectors belong to."""

    tenant: str
    user: str
    count: int
    fingerprint: str
    updated_at: float
    stale: bool


@dataclass(frozen=True)
class RebuildReport:
    """What ``rebuild`` did: users and documents re-compressed, and documents the new model could not compress (their
    users stay stale)."""

    users: int
    documents: int
    failed: list[tuple[str, str, str, str]]  # (tenant, user, doc_id, reason)


def _first_occurrences(doc_ids: Sequence[str], hashes: Sequence[str]) -> dict[str, int]:
    """Each document id's first index in a request, in order; the same id with two texts is a
    ``DocumentConflictError``."""
    first: dict[str, int] = {}
    for k, (doc_id, digest) in enumerate(zip(doc_ids, hashes, strict=True)):
        if doc_id in first and hashes[first[doc_id]] != digest:
            raise DocumentConflictError(f"document id {doc_id!r} is given twice with different texts")
        first.setdefault(doc_id, k)
    return first


class ProfileStore:
    """Profiles of users of many tenants in one SQLite file (WAL, durable commits).

    Args:
        path: the database file (created if absent).
        fingerprint: the model fingerprint of every vector written and the only one served.
        shape: ``(K, D)`` of one compression of that model.
    Thread-safe: one connection, one lock; each write is one transaction, committed to disk before returning.
    """

    def __init__(self, path: str | Path, fingerprint: str, shape: tuple[int, int]) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.shape = (int(shape[0]), int(shape[1]))
        self._lock = threading.RLock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), not opened implicitly by the module.
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced before it returns, so an acknowledged write survives a crash or power loss.
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._write():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema {row[0]}, this commer reads schema {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _vector(self, data: bytes, tenant: str, user: str) -> torch.Tensor:
        try:
            return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(self.shape).copy())
        except ValueError as err:
            raise CorruptProfileError(
                f"a stored compression of user {user!r} (tenant {tenant!r}) is damaged ({len(data)} bytes, expected "
                f"{4 * self.shape[0] * self.shape[1]}): delete the user and add the documents again"
            ) from err

    def _profile_row(self, tenant: str, user: str) -> tuple[int, bytes, str, float]:
        row = self._conn.execute(
            "SELECT count, sum, fingerprint, updated_at FROM profiles WHERE tenant = ? AND user = ?", (tenant, user)
        ).fetchone()
        if row is None:
            raise UnknownUserError(tenant, user)
        return row

    def _fresh_state(self, tenant: str, user: str) -> ProfileState:
        count, blob, fingerprint, _ = self._profile_row(tenant, user)
        if fingerprint != self.fingerprint:
            raise StaleProfileError(tenant, user, fingerprint, self.fingerprint)
        try:
            state = ProfileState.from_bytes(blob)
        except (struct.error, ValueError) as err:
            raise CorruptProfileError(
                f"the stored profile of user {user!r} (tenant {tenant!r}) is damaged ({err}): delete the user and add "
                "the documents again"
            ) from err
        if state.shape != self.shape or state.count != count:
            raise CorruptProfileError(
                f"profile of user {user!r} (tenant {tenant!r}) is corrupt: header disagrees with row"
            )
        return state

    def _is_stored(self, tenant: str, user: str, doc_id: str, digest: str) -> bool:
        """Whether the user has document ``doc_id`` with this text (call under the lock); another text is a
        ``DocumentConflictError``."""
        row = self._conn.execute(
            "SELECT sha256 FROM documents WHERE tenant = ? AND user = ? AND doc_id = ?", (tenant, user, doc_id)
        ).fetchone()
        if row is not None and row[0] != digest:
            raise DocumentConflictError(
                f"user {user!r} already has a document {doc_id!r} with another text: remove it first"
            )
        return row is not None

    def _put_state(self, tenant: str, user: str, state: ProfileState, fingerprint: str | None = None) -> None:
        self._conn.execute(
            "INSERT INTO profiles (tenant, user, count, sum, fingerprint, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, user) DO UPDATE SET count = excluded.count, sum = excluded.sum, "
            "fingerprint = excluded.fingerprint, updated_at = excluded.updated_at",
            (tenant, user, state.count, state.to_bytes(), fingerprint or self.fingerprint, time.time()),
        )

    # -- writes ---------------------------------------------------------------------------------------------------
    def add_documents(
        self,
        tenant: str,
        user: str,
        texts: Sequence[str],
        compressions: torch.Tensor,
        ids: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Add documents with their ``(n, K, D)`` compressions to a profile (created if absent), in one transaction.

        Document ids are ``ids[i]`` where given, else the SHA-256 of the text. A document whose id is already stored
        with the same text is skipped (re-adding is idempotent); with another text it raises
        ``DocumentConflictError`` and nothing is written. Returns the ids, in input order.
        Cost: O(n) lookups by primary key and one profile row update, independent of the profile's size.
        """
        return self.insert_documents(tenant, user, texts, compressions, ids).ids

    def insert_documents(
        self,
        tenant: str,
        user: str,
        texts: Sequence[str],
        compressions: torch.Tensor,
        ids: Sequence[str | None] | None = None,
    ) -> AddedDocuments:
        """``add_documents``, also reporting which documents this call stored: of two identical adds racing, one
        stores the document and the other finds it there."""
        if compressions.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts and {compressions.shape[0]} compressions")
        if tuple(compressions.shape[1:]) != self.shape:
            raise ValueError(f"compressions of shape {tuple(compressions.shape[1:])}, this store holds {self.shape}")
        doc_ids, hashes = document_ids(texts, ids)
        vectors = compressions.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
        added: list[str] = []
        with self._write() as conn:
            try:
                state = self._fresh_state(tenant, user)
            except UnknownUserError:
                state = ProfileState(*self.shape)
            now = time.time()
            for k in _first_occurrences(doc_ids, hashes).values():
                doc_id, digest, text, vector = doc_ids[k], hashes[k], texts[k], vectors[k]
                if self._is_stored(tenant, user, doc_id, digest):
                    continue
                conn.execute(
                    "INSERT INTO documents (tenant, user, doc_id, sha256, text, compression, fingerprint, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, user, doc_id, digest, text, vector.tobytes(), self.fingerprint, now),
                )
                state.add(torch.from_numpy(vector))
                added.append(doc_id)
            self._put_state(tenant, user, state)
        return AddedDocuments(doc_ids, added, state.count)

    def import_profile(self, tenant: str, user: str, state: ProfileState) -> None:
        """Set a profile to a sum and count computed elsewhere (``commer compress-corpus`` without per-document
        compressions), replacing any sum-only profile the user had: importing the same corpus twice is a no-op.

        Such a profile has no documents: none can be removed one by one, and after a model change ``rebuild`` has no
        texts to re-compress it from and resets it to empty (import the corpus compressed by the new model instead).
        A user who has stored documents is refused (their sum would no longer be their documents' sum)."""
        if state.shape != self.shape:
            raise ValueError(f"a profile of shape {state.shape}, this store holds {self.shape}")
        with self._write() as conn:
            row = conn.execute(
                "SELECT 1 FROM documents WHERE tenant = ? AND user = ? LIMIT 1", (tenant, user)
            ).fetchone()
            if row is not None:
                raise DocumentConflictError(
                    f"user {user!r} (tenant {tenant!r}) has stored documents: import per-document compressions for "
                    "them, or delete the user first"
                )
            self._put_state(tenant, user, state)

    def remove_document(self, tenant: str, user: str, doc_id: str) -> int:
        """Remove one document and subtract its stored compression; returns the profile's new count."""
        with self._write() as conn:
            state = self._fresh_state(tenant, user)
            row = conn.execute(
                "SELECT compression FROM documents WHERE tenant = ? AND user = ? AND doc_id = ?", (tenant, user, doc_id)
            ).fetchone()
            if row is None:
                raise UnknownDocumentError(tenant, user, doc_id)
            state.remove(self._vector(row[0], tenant, user))
            conn.execute("DELETE FROM documents WHERE tenant = ? AND user = ? AND doc_id = ?", (tenant, user, doc_id))
            self._put_state(tenant, user, state)
        return state.count

    def delete_user(self, tenant: str, user: str) -> int:
        """Delete a profile and all its documents; returns how many documents were deleted."""
        with self._write() as conn:
            self._profile_row(tenant, user)
            deleted = conn.execute("DELETE FROM documents WHERE tenant = ? AND user = ?", (tenant, user)).rowcount
            conn.execute("DELETE FROM profiles WHERE tenant = ? AND user = ?", (tenant, user))
        return deleted

    # -- reads ----------------------------------------------------------------------------------------------------
    def get_profile(self, tenant: str, user: str) -> ProfileState:
        """The user's running sum and count (raises ``UnknownUserError``, or ``StaleProfileError`` for vectors of
        another model)."""
        with self._lock:
            return self._fresh_state(tenant, user)

    def user_info(self, tenant: str, user: str) -> UserInfo:
        """Count and fingerprint of a profile, without reading its vectors' documents."""
        with self._lock:
            count, _, fingerprint, updated_at = self._profile_row(tenant, user)
        return UserInfo(tenant, user, count, fingerprint, updated_at, fingerprint != self.fingerprint)

    def missing_documents(
        self, tenant: str, user: str, texts: Sequence[str], ids: Sequence[str | None] | None = None
    ) -> list[int]:
        """Indices of the documents ``add_documents`` would actually add (first occurrence of each new id): those
        worth compressing. Raises ``DocumentConflictError`` for an id stored with another text and
        ``StaleProfileError`` for a profile of another model, before any compute is spent."""
        doc_ids, hashes = document_ids(texts, ids)
        first = _first_occurrences(doc_ids, hashes)
        with self._lock:
            try:
                self._fresh_state(tenant, user)
            except UnknownUserError:
                return sorted(first.values())
            return sorted(k for k in first.values() if not self._is_stored(tenant, user, doc_ids[k], hashes[k]))

    def list_documents(self, tenant: str, user: str) -> list[DocumentInfo]:
        """The user's documents, oldest first."""
        with self._lock:
            self._profile_row(tenant, user)
            rows = self._conn.execute(
                "SELECT doc_id, sha256, length(text), fingerprint, added_at FROM documents "
                "WHERE tenant = ? AND user = ? ORDER BY added_at, doc_id",
                (tenant, user),
            ).fetchall()
        return [DocumentInfo(*row) for row in rows]

    def get_text(self, tenant: str, user: str, doc_id: str) -> str:
        """A stored document's text."""
        with self._lock:
            row = self._conn.execute(
                "SELECT text FROM documents WHERE tenant = ? AND user = ? AND doc_id = ?", (tenant, user, doc_id)
            ).fetchone()
        if row is None:
            raise UnknownDocumentError(tenant, user, doc_id)
        return row[0]

    def users(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """``(tenant, user)`` of every profile, or of one tenant's."""
        with self._lock:
            if tenant is None:
                return self._conn.execute("SELECT tenant, user FROM profiles ORDER BY tenant, user").fetchall()
            rows = self._conn.execute("SELECT tenant, user FROM profiles WHERE tenant = ? ORDER BY user", (tenant,))
            return rows.fetchall()

    def recompute_mean(self, tenant: str, user: str) -> torch.Tensor | None:
        """The mean recomputed from every stored document compression (O(n): for checks, not for serving)."""
        with self._lock:
            self._fresh_state(tenant, user)
            rows = self._conn.execute(
                "SELECT compression FROM documents WHERE tenant = ? AND user = ?", (tenant, user)
            ).fetchall()
        if not rows:
            return None
        total = torch.zeros(self.shape, dtype=torch.float64)
        for (blob,) in rows:
            total += self._vector(blob, tenant, user).double()
        return (total / len(rows)).float()

    def document_compressions(
        self, tenant: str, user: str, with_texts: bool = False
    ) -> tuple[torch.Tensor, list[str] | None]:
        """Every stored document's ``(K, D)`` compression, ``(n, K, D)`` in the order they were added (what
        retrieval-merge ranks), and their texts when asked."""
        with self._lock:
            self._fresh_state(tenant, user)
            rows = self._conn.execute(
                f"SELECT compression{', text' if with_texts else ''} FROM documents WHERE tenant = ? AND user = ? "
                "ORDER BY rowid",
                (tenant, user),
            ).fetchall()
        vectors = [self._vector(row[0], tenant, user) for row in rows]
        compressions = torch.stack(vectors) if vectors else torch.empty(0, *self.shape)
        return compressions, [row[1] for row in rows] if with_texts else None

    def stale_users(self) -> list[tuple[str, str]]:
        """Profiles holding vectors of another model: what ``rebuild`` would re-compress."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT tenant, user FROM profiles WHERE fingerprint != ? "
                "UNION SELECT DISTINCT tenant, user FROM documents WHERE fingerprint != ? ORDER BY 1, 2",
                (self.fingerprint, self.fingerprint),
            )
            return rows.fetchall()

    # -- model change ---------------------------------------------------------------------------------------------
    def rebuild(self, personalizer: Personalizer, batch_size: int = 16) -> RebuildReport:
        """Re-compress the stored texts of every stale profile with ``personalizer`` (whose fingerprint must be this
        store's) and rewrite its documents and sum. Each user is one transaction, so an interrupted rebuild resumes
        where it stopped. Documents the new model cannot compress (e.g. too long for its context) leave their user
        stale and are listed in the report."""
        if (found := model_fingerprint(personalizer.model)) != self.fingerprint:
            raise StoreError(f"rebuild needs the store's model {self.fingerprint}, the personalizer is model {found}")
        if tuple(personalizer.shape) != self.shape:
            raise StoreError(f"the personalizer's shape {personalizer.shape} is not the store's {self.shape}")
        users = documents = 0
        failed: list[tuple[str, str, str, str]] = []
        for tenant, user in self.stale_users():
            with self._lock:
                rows = self._conn.execute(
                    "SELECT doc_id, text FROM documents WHERE tenant = ? AND user = ?", (tenant, user)
                ).fetchall()
            vectors: dict[str, np.ndarray] = {}
            for doc_id, text in rows:
                try:
                    vectors[doc_id] = personalizer.compress([text], batch_size)[0].numpy().astype("<f4")
                except ValueError as err:  # ContextTooLongError is a ValueError
                    failed.append((tenant, user, doc_id, str(err)))
            if len(vectors) < len(rows):
                continue
            with self._write() as conn:
                # Documents added or removed since the read above would make the sum wrong: redo the user later.
                current = conn.execute(
                    "SELECT doc_id FROM documents WHERE tenant = ? AND user = ?", (tenant, user)
                ).fetchall()
                if {d for (d,) in current} != set(vectors):
                    failed.append((tenant, user, "*", "documents changed during rebuild: run rebuild again"))
                    continue
                state = ProfileState(*self.shape)
                for doc_id, vector in vectors.items():
                    conn.execute(
                        "UPDATE documents SET compression = ?, fingerprint = ? "
                        "WHERE tenant = ? AND user = ? AND doc_id = ?",
                        (vector.tobytes(), self.fingerprint, tenant, user, doc_id),
                    )
                    state.add(torch.from_numpy(vector))
                self._put_state(tenant, user, state)
            users += 1
            documents += len(vectors)
        return RebuildReport(users, documents, failed)
