"""Downloads that resume and verify, and where commer keeps what it downloads and converts (``commer_home``): used
for the data sets (``commer.data.download``) and for the embedded backbone's weights (``commer.backbone``)."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from commer.errors import CommerError

CHUNK = 1 << 20


class DownloadError(CommerError, ValueError):
    """A download failed (not found, interrupted, or not the file expected); the message names the URL."""


def commer_home() -> Path:
    """Where commer keeps downloads and conversions: ``$COMMER_HOME``, else the user's cache folder."""
    if env := os.environ.get("COMMER_HOME"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("commer"))


@dataclass(frozen=True)
class Remote:
    """One published file: where it is, what it becomes in the data set's folder, and its SHA-256 if pinned."""

    url: str
    target: str
    sha256: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(remote: Remote, part: Path, timeout: float = 60.0) -> str:
    """Download ``remote`` to ``part``, resuming what is there; returns its SHA-256 (checked when pinned)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the manifest's https URLs
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch: the part is complete
            return _checked(remote, part)
        raise DownloadError(f"{remote.url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DownloadError(f"{remote.url}: cannot connect ({err})") from None
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        with (
            part.open("ab" if resumed else "wb") as out,
            tqdm(
                total=(expected or 0) + (have if resumed else 0) or None,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=remote.target,
                leave=False,
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # the connection dropped mid-file
                raise DownloadError(
                    f"{remote.url}: truncated transfer, interrupted after {received} bytes ({err!r}): rerun to resume"
                ) from None
    if expected is not None and received < expected:
        raise DownloadError(f"{remote.url}: truncated transfer, {received} of {expected} bytes: rerun to resume")
    return _checked(remote, part)


def _checked(remote: Remote, part: Path) -> str:
    digest = sha256_file(part)
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink()  # a wrong file is not resumed from
        raise DownloadError(f"{remote.url}: SHA-256 {digest}, expected {remote.sha256}: the download was deleted")
    return digest
