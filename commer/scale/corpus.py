"""Compress a whole corpus of users' documents into profiles: in one process, or on a Ray cluster with Ray Data.

Input: JSONL or Parquet rows holding a user id and a document text (and optionally a document id). Output, a folder:

- ``profiles/*.parquet``, one row per user: ``user``, ``count`` (int64) and ``sum`` (``K * D`` float64, row-major):
  the running sum and count of a ``ProfileState``;
- ``documents/*.parquet`` (only with ``per_document``), one row per document: ``user``, ``doc_id``, ``sha256``,
  ``text`` and ``compression`` (``K * D`` float32): exactly what ``ProfileStore.add_documents`` stores.

Every row carries the ``fingerprint`` of the model that computed it, as the store's rows do, so ``import_profiles``
refuses vectors of another model. A user's document id (default: the SHA-256 of its text) counts once, as in the
store: a duplicate document is compressed but not added twice, and one id given to two texts is an error.

The two engines run the same code on each batch (``_Compressor``) and sum in float64. Batches are cut differently
(Ray Data decides its blocks), and a document padded to another width comes out different in float32's last bits
(~1e-7 relative on SmolLM2), so the engines' profiles agree to that, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from commer.config import DEFAULT_BACKBONE, DEFAULT_K
from commer.data.errors import DataError
from commer.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from commer.store import ProfileStore

Engine = Literal["local", "ray"]
PROFILES, DOCUMENTS = "profiles", "documents"
_SUM_COLUMNS = ["user", "doc_id", "sha256", "compression", "fingerprint"]


@dataclass(frozen=True)
class ModelSpec:
    """Which model compresses: what each worker loads (as ``commer serve`` would, so fingerprints match)."""

    checkpoint: str | None = None
    backbone: str = DEFAULT_BACKBONE
    num_embeddings: int = DEFAULT_K  # K of an untrained model; a checkpoint brings its own
    bf16_compress: bool = False  # see commer.serving.Personalizer


@dataclass(frozen=True)
class Columns:
    """Names of the input's columns."""

    user: str = "user_id"
    text: str = "text"
    doc_id: str | None = None  # default: the SHA-256 of the text


@dataclass(frozen=True)
class CorpusSummary:
    """What a run wrote."""

    users: int
    documents: int
    fingerprint: str
    output: str


@dataclass(frozen=True)
class ImportReport:
    """What ``import_profiles`` read: users, and documents (0 when only sums were imported; documents the store
    already had are read but not added again)."""

    users: int
    documents: int


class _Compressor:
    """Rows of documents -> rows with their compressions. A Ray Data callable class: each worker loads the model once
    in ``__init__`` and keeps it for every batch it is given; the local engine uses one instance."""

    def __init__(self, model: ModelSpec, columns: Columns, keep_text: bool, threads: int | None = None) -> None:
        from commer.checkpoint import model_fingerprint
        from commer.serving import load_personalizer

        if threads is not None:
            # A worker given N CPUs by Ray must not run torch on all of the node's cores.
            torch.set_num_threads(threads)
        self.personalizer = load_personalizer(
            model.checkpoint, model.backbone, model.num_embeddings, model.bf16_compress
        )
        if torch.cuda.is_available():  # Ray only shows a worker the GPU it was given
            self.personalizer.model.to("cuda")
        self.fingerprint = model_fingerprint(self.personalizer.model)
        self.columns, self.keep_text = columns, keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa
        import pyarrow.compute as pc

        from commer.serving import document_ids

        texts = batch[self.columns.text].to_pylist()
        given = None
        if self.columns.doc_id is not None:
            given = pc.cast(batch[self.columns.doc_id], pa.string()).to_pylist()
        # a non-string text is refused by compress below, naming it; its hash is never used
        doc_ids, hashes = document_ids([t if isinstance(t, str) else "" for t in texts], given)
        k, d = self.personalizer.shape
        vectors = (
            self.personalizer.compress(texts).reshape(len(texts), k * d).numpy()
            if texts
            else np.zeros((0, k * d), dtype=np.float32)
        )
        out = {
            "user": pc.cast(batch[self.columns.user], pa.string()),
            "doc_id": pa.array(doc_ids, pa.string()),
            "sha256": pa.array(hashes, pa.string()),
        }
        if self.keep_text:
            out["text"] = pa.array(texts, pa.string())
        out["compression"] = _fixed_lists(vectors)
        out["fingerprint"] = pa.array([self.fingerprint] * len(texts), pa.string())
        return pa.table(out)


def _fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """An ``(n, m)`` matrix as a column of ``n`` lists of ``m`` numbers (plain Parquet, readable without commer)."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


def _matrix(column: pa.ChunkedArray | pa.Array, dtype: str) -> np.ndarray:
    """Inverse of ``_fixed_lists`` (lists read back from Parquet may come as variable-size lists)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=dtype)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(column), -1)


class _UserSums:
    """Per-user float64 sums and counts of compressed rows, each (user, document id) counted once."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.seen: dict[str, dict[str, str]] = {}
        self.fingerprint: str | None = None

    def add(self, table: pa.Table) -> _UserSums:
        vectors = _matrix(table["compression"], "float32")
        rows: dict[str, list[int]] = {}
        columns = zip(*(table[c].to_pylist() for c in ("user", "doc_id", "sha256", "fingerprint")), strict=True)
        for i, (user, doc_id, digest, fingerprint) in enumerate(columns):
            if self.fingerprint is None:
                self.fingerprint = fingerprint
            elif fingerprint != self.fingerprint:
                raise DataError(f"compressions of two models ({self.fingerprint}, {fingerprint}) in one corpus")
            seen = self.seen.setdefault(user, {})
            if doc_id in seen:
                if seen[doc_id] != digest:
                    raise DataError(f"user {user!r}: document id {doc_id!r} is given to two different texts")
                continue
            seen[doc_id] = digest
            rows.setdefault(user, []).append(i)
        for user, idx in rows.items():
            part = vectors[idx].astype(np.float64).sum(0)
            self.sums[user] = self.sums[user] + part if user in self.sums else part
            self.counts[user] = self.counts.get(user, 0) + len(idx)
        return self

    def table(self) -> pa.Table:
        import pyarrow as pa

        users = sorted(self.sums)
        width = len(next(iter(self.sums.values()))) if users else 0
        matrix = np.stack([self.sums[u] for u in users]) if users else np.zeros((0, width))
        return pa.table(
            {
                "user": pa.array(users, pa.string()),
                "count": pa.array([self.counts[u] for u in users], pa.int64()),
                "sum": _fixed_lists(matrix),
                "fingerprint": pa.array([self.fingerprint] * len(users), pa.string()),
            }
        )


def _sum_group(group: pa.Table) -> pa.Table:
    """``map_groups`` function: one user's compressed rows -> that user's profile row."""
    return _UserSums().add(group).table()


def _input_format(path: Path) -> str:
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return "json"
    raise DataError(f"{path}: expected a .jsonl file (one JSON object a line), a .parquet file or a folder of them")


def _needed(columns: Columns) -> list[str]:
    return [c for c in (columns.user, columns.text, columns.doc_id) if c is not None]


def _check_columns(names: list[str], columns: Columns, path: Path) -> None:
    missing = [c for c in _needed(columns) if c not in names]
    if missing:
        raise DataError(f"{path} has no column(s) {', '.join(missing)}; its columns: {', '.join(names)}")


def _local_batches(path: Path, columns: Columns, batch_size: int) -> Iterator[pa.Table]:
    import pyarrow as pa
    import pyarrow.dataset as pds
    import pyarrow.json as pj

    if _input_format(path) == "json":
        table = pj.read_json(path)
        _check_columns(table.column_names, columns, path)
        for batch in table.select(_needed(columns)).to_batches(batch_size):
            yield pa.Table.from_batches([batch])
        return
    dataset = pds.dataset(path, format="parquet")
    _check_columns(dataset.schema.names, columns, path)
    for batch in dataset.to_batches(columns=_needed(columns), batch_size=batch_size):
        yield pa.Table.from_batches([batch])


def _prepare_output(output: Path) -> tuple[Path, Path]:
    profiles, documents = output / PROFILES, output / DOCUMENTS
    if profiles.exists() or documents.exists():
        raise DataError(f"{output} already holds a compressed corpus: choose a new folder or delete it")
    output.mkdir(parents=True, exist_ok=True)
    return profiles, documents


def _run_local(
    path: Path, output: Path, model: ModelSpec, columns: Columns, per_document: bool, batch_size: int
) -> None:
    import pyarrow.parquet as pq

    profiles_dir, documents_dir = _prepare_output(output)
    compressor = _Compressor(model, columns, keep_text=per_document)
    sums = _UserSums()
    writer = None
    try:
        for batch in _local_batches(path, columns, batch_size):
            compressed = compressor(batch)
            sums.add(compressed)
            if per_document:
                if writer is None:
                    documents_dir.mkdir()
                    writer = pq.ParquetWriter(documents_dir / "part-00000.parquet", compressed.schema)
                writer.write_table(compressed)
    finally:
        if writer is not None:
            writer.close()
    profiles_dir.mkdir()
    pq.write_table(sums.table(), profiles_dir / "part-00000.parquet")


def _run_ray(
    path: Path,
    output: Path,
    model: ModelSpec,
    columns: Columns,
    per_document: bool,
    batch_size: int,
    workers: int,
    cpus_per_worker: float,
    address: str | None,
) -> None:
    import ray
    import ray.data

    profiles_dir, documents_dir = _prepare_output(output)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    if _input_format(path) == "json":
        dataset = ray.data.read_json(str(path), lines=True)
    else:
        dataset = ray.data.read_parquet(str(path))
    _check_columns(dataset.columns(), columns, path)
    dataset = dataset.select_columns(_needed(columns))
    resources = ray.cluster_resources()
    has_gpus = resources.get("GPU", 0) >= 1
    if workers * cpus_per_worker >= resources.get("CPU", 0):
        # Reading and writing tasks need CPUs too: model replicas holding all of them stall the pipeline for good.
        raise DataError(
            f"{workers} workers x {cpus_per_worker} CPUs take all {resources.get('CPU', 0):g} CPUs of the Ray cluster, "
            "leaving none to read and write data: lower --workers or --cpus-per-worker"
        )
    compressed = dataset.map_batches(
        _Compressor,
        fn_constructor_args=(model, columns, per_document, max(1, int(cpus_per_worker))),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=1 if has_gpus else None,
    )
    if per_document:
        compressed.write_parquet(str(documents_dir))
        # Summing from what was written, not from ``compressed``: the latter would compress everything again.
        compressed = ray.data.read_parquet(str(documents_dir)).select_columns(_SUM_COLUMNS)
    compressed.groupby("user").map_groups(_sum_group, batch_format="pyarrow").write_parquet(str(profiles_dir))


def compress_corpus(
    input_path: str | Path,
    output_dir: str | Path,
    model: ModelSpec | None = None,
    columns: Columns | None = None,
    engine: Engine = "local",
    per_document: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
) -> CorpusSummary:
    """Compress every document of ``input_path`` and write per-user sums and counts (and, with ``per_document``,
    every document's compression) as Parquet under ``output_dir`` (which must not hold a corpus already).

    ``engine="ray"`` runs ``workers`` model replicas (``cpus_per_worker`` CPUs each, and one GPU each when the cluster
    has GPUs) on the Ray cluster at ``address`` (default: the one this process is connected to, else a new local
    one); ``"local"`` runs one model in this process. ``batch_size`` is documents per batch handed to a model.
    """
    model, columns = model or ModelSpec(), columns or Columns()
    path, output = Path(input_path), Path(output_dir)
    if not path.exists():
        raise DataError(f"no such input: {path}")
    if engine == "local":
        _run_local(path, output, model, columns, per_document, batch_size)
    elif engine == "ray":
        _run_ray(path, output, model, columns, per_document, batch_size, workers, cpus_per_worker, address)
    else:
        raise ConfigError(f"engine must be 'local' or 'ray', got {engine!r}")
    return _summary(output)


def _summary(output: Path) -> CorpusSummary:
    import pyarrow.dataset as pds

    table = pds.dataset(output / PROFILES, format="parquet").to_table(columns=["count", "fingerprint"])
    fingerprints = set(table["fingerprint"].to_pylist())
    return CorpusSummary(
        users=table.num_rows,
        documents=int(sum(table["count"].to_pylist())),
        fingerprint=fingerprints.pop() if len(fingerprints) == 1 else "",
        output=str(output),
    )


def read_profiles(output_dir: str | Path) -> dict[str, tuple[np.ndarray, int]]:
    """``user -> (sum as a K*D float64 vector, count)`` from a run's output (for checks and small corpora)."""
    import pyarrow.dataset as pds

    table = pds.dataset(Path(output_dir) / PROFILES, format="parquet").to_table()
    sums, counts = _matrix(table["sum"], "float64"), table["count"].to_pylist()
    return {user: (sums[i], counts[i]) for i, user in enumerate(table["user"].to_pylist())}


def import_profiles(store: ProfileStore, output_dir: str | Path, tenant: str) -> ImportReport:
    """Put a run's profiles into ``store`` under ``tenant``.

    With per-document compressions in ``output_dir``, every document is added as ``commer profile add`` would have
    added it (idempotent; documents can later be removed one by one and rebuilt). With sums only, each user's profile
    is set to the sum and count (``ProfileStore.import_profile``). Vectors of another model than the store's are
    refused before anything is written.
    """
    import pyarrow.dataset as pds

    from commer.merge import ProfileState
    from commer.store import StoreError

    output = Path(output_dir)
    k, d = store.shape
    per_document = (output / DOCUMENTS).is_dir()
    source = pds.dataset(output / (DOCUMENTS if per_document else PROFILES), format="parquet")
    found = set(source.to_table(columns=["fingerprint"])["fingerprint"].unique().to_pylist())
    if found - {store.fingerprint}:
        raise StoreError(
            f"{output} holds vectors of model(s) {', '.join(sorted(found))}; this store serves {store.fingerprint}"
        )
    users, documents = set(), 0
    if per_document:
        for batch in source.to_batches(columns=["user", "doc_id", "text", "compression"]):
            vectors = torch.from_numpy(_matrix(batch["compression"], "float32").reshape(len(batch), k, d))
            texts, doc_ids = batch["text"].to_pylist(), batch["doc_id"].to_pylist()
            rows: dict[str, list[int]] = {}
            for i, user in enumerate(batch["user"].to_pylist()):
                rows.setdefault(user, []).append(i)
            for user, idx in rows.items():  # one transaction per user and batch
                store.add_documents(tenant, user, [texts[i] for i in idx], vectors[idx], [doc_ids[i] for i in idx])
                users.add(user)
                documents += len(idx)
        return ImportReport(len(users), documents)
    for batch in source.to_batches(columns=["user", "count", "sum"]):
        sums = _matrix(batch["sum"], "float64").reshape(len(batch), k, d)
        for user, count, total in zip(batch["user"].to_pylist(), batch["count"].to_pylist(), sums, strict=True):
            state = ProfileState(k, d)
            state.sum, state.count = torch.from_numpy(total.copy()), count
            store.import_profile(tenant, user, state)
            users.add(user)
    return ImportReport(len(users), 0)
