"""``commer data download``: fetch each data set from its public source into the layout the loaders read.

Every file is streamed to a ``.part`` file (a partial one is resumed with an HTTP ``Range`` request), checked against
its pinned SHA-256 where the manifest has one, and converted where its published form is not the loaders' (FineWeb's
rows). A data set appears in the data directory only once all its files are complete: the download builds it in a
staging folder beside it and renames it into place, so a failure (404, a truncated transfer, a checksum mismatch)
leaves no half-written data set, only the ``.part`` files a rerun resumes from. Each data set's folder gets a
``SHA256SUMS`` of what was written.

The sources, their licences and what each file becomes are in ``DATASETS`` (and docs/data.md). The manifest's
checksums are ``None`` where this project could not read the upstream file to pin it; the sums observed on the first
download are then written to ``SHA256SUMS`` (trust on first use) and printed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from commer.data.errors import DATA_FOLDERS, DataError, download_target
from commer.fetch import Remote, fetch, sha256_file

CHUNK = 1 << 20
FINEWEB_ROWS = 6_500  # documents kept from FineWeb's sample-10BT, as in this project's development copy
FINEWEB_PAGE = 100  # the most rows the datasets-server API returns per request


@dataclass(frozen=True)
class Dataset:
    """A data set as the loaders read it: its folder, its files, where it comes from and under which licence.
    ``convert`` turns the downloaded files (``.part`` paths, in order) into the folder's files."""

    task: str
    folder: str
    files: tuple[Remote, ...]
    licence: str
    source: str
    convert: Callable[[list[Path], Path], None] | None = field(default=None, compare=False)


def _fineweb_rows(parts: list[Path], folder: Path) -> None:
    """The datasets-server pages of FineWeb's sample-10BT -> ``fineweb_sample.jsonl.gz`` (``{"id","url","text"}``)."""
    with gzip.open(folder / "fineweb_sample.jsonl.gz", "wt", encoding="utf-8") as out:
        for part in parts:
            try:
                rows = json.loads(part.read_text(encoding="utf-8"))["rows"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{part.name}: not a datasets-server rows page ({err})") from err
            for row in rows:
                record = row["row"]
                out.write(json.dumps({k: record[k] for k in ("id", "url", "text")}, ensure_ascii=False) + "\n")


_LAMP = "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_7/dev"
_ROWS = "https://datasets-server.huggingface.co/rows?dataset=HuggingFaceFW/fineweb&config=sample-10BT&split=train"
_PERLTQA = "https://raw.githubusercontent.com/Elvin-Yiming-Du/PerLTQA/main/Dataset/en_v2"
DATASETS: dict[str, Dataset] = {
    d.task: d
    for d in (
        Dataset(
            "lamp7",
            "lamp7",
            (
                Remote(f"{_LAMP}/dev_questions.json", "LaMP_7_questions.json"),
                Remote(f"{_LAMP}/dev_outputs.json", "LaMP_7_outputs.json"),
            ),
            "LaMP terms: research use (built from Sentiment140)",
            "LaMP benchmark, LaMP-7 user-based dev split (https://lamp-benchmark.github.io)",
        ),
        Dataset(
            "news",
            "news_headlines",
            (
                Remote(
                    "https://huggingface.co/datasets/heegyu/news-category-dataset/resolve/main/"
                    "News_Category_Dataset_v3.json",
                    "huffpost_news.jsonl",
                ),
            ),
            "CC BY 4.0 (News Category Dataset, Misra 2022)",
            "HuffPost News Category Dataset v3, the records LaMP-4 was built from",
        ),
        Dataset(
            "fineweb",
            "fineweb",
            tuple(
                Remote(f"{_ROWS}&offset={i}&length={FINEWEB_PAGE}", f"rows-{i:06d}.json")
                for i in range(0, FINEWEB_ROWS, FINEWEB_PAGE)
            ),
            "ODC-By 1.0 (FineWeb); the pages' own terms of use apply to their text",
            f"FineWeb sample-10BT, its first {FINEWEB_ROWS} documents (HuggingFaceFW/fineweb)",
            convert=_fineweb_rows,
        ),
        Dataset(
            "perltqa",
            "perltqa",
            (
                Remote(f"{_PERLTQA}/perltmem_en_v2.json", "perltmem_subset.json"),
                Remote(f"{_PERLTQA}/perltqa_en_v2.json", "perltqa_subset.json"),
            ),
            "CC BY-NC 4.0 (cite Du et al., SIGHAN-10 2024)",
            "PerLTQA English v2, all personas (github.com/Elvin-Yiming-Du/PerLTQA)",
        ),
    )
}
assert set(DATA_FOLDERS) == {d.folder for d in DATASETS.values()}, "errors.DATA_FOLDERS must name every data set"


def resolve_tasks(names: Sequence[str]) -> list[Dataset]:
    """The data sets ``names`` ask for (``all``: every one; ``lamp4`` is ``news``)."""
    aliases = {"lamp4": "news"}
    wanted = list(DATASETS) if "all" in names else [aliases.get(n, n) for n in names]
    unknown = [n for n in wanted if n not in DATASETS]
    if unknown or not wanted:
        raise DataError(f"unknown data set(s) {unknown or names}: choose from {', '.join(DATASETS)}, lamp4 or all")
    return [DATASETS[n] for n in dict.fromkeys(wanted)]


def download(dataset: Dataset, root: Path | None = None, force: bool = False) -> Path:
    """Fetch ``dataset`` into ``root`` (default: ``$COMMER_DATA`` or the data home); returns its folder. A data set
    already there is kept unless ``force``."""
    root = Path(root) if root is not None else download_target()
    final = root / dataset.folder
    if final.is_dir() and not force:
        return final
    partial = root / ".partial" / dataset.folder
    parts, sums = [], {}
    for remote in dataset.files:
        part = partial / (remote.target + ".part")
        sums[remote.target] = fetch(remote, part)
        parts.append(part)
    staging = root / ".partial" / f"{dataset.folder}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if dataset.convert is not None:
        dataset.convert(parts, staging)
    else:
        for remote, part in zip(dataset.files, parts, strict=True):
            shutil.copyfile(part, staging / remote.target)
    written = sorted(p for p in staging.iterdir() if p.is_file())
    (staging / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in written))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)  # the data set appears whole, or not at all
    shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):  # other data sets' partial downloads may still be there
        (root / ".partial").rmdir()
    return final


def with_base_url(dataset: Dataset, base: str) -> Dataset:
    """``dataset`` with every file fetched from ``base`` + its target name instead (a mirror of the data layout, or a
    test server)."""
    files = tuple(replace(r, url=f"{base.rstrip('/')}/{r.target}") for r in dataset.files)
    return replace(dataset, files=files)
