"""``cpmlive download`` against a local stand-in of the Hugging Face Hub's HTTP API.

The stand-in answers the three requests ``huggingface_hub.snapshot_download`` makes: the
repository's info (``/api/models/{repo}``, or ``.../revision/{rev}``), its file tree
(``/api/models/{repo}/tree/{commit}``) and each file (``/{repo}/resolve/{commit}/{path}``, HEAD
and GET, with the ETag, X-Repo-Commit and Content-Length headers the client checks). Unknown
repositories and revisions get the hub's 404s with its ``X-Error-Code``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

from cpmlive.cli import main
from cpmlive.download import check_repo_id, download
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.convert import checkpoint_info
from cpmlive.resources import demo_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _demo_files() -> dict[str, bytes]:
    """A CPM-Ant checkpoint in the hub's layout: the shipped demo's config, one weight shard's
    worth of files (the demo itself) and its vocabulary, plus a README the filter can leave out."""
    files = {p.name: p.read_bytes() for p in demo_dir().iterdir() if p.is_file()}
    files["README.md"] = "# demo\n".encode()
    return files


REPOS = {"openbmb/cpm-demo": _demo_files(), "someone/only-text": {"notes/a.txt": b"hello\n", "b.json": b"{}"}}


class Hub(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _not_found(self, code: str) -> None:
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code, "X-Error-Message": code})

    def _repo(self, repo: str, revision: str) -> dict[str, bytes] | None:
        if repo not in REPOS:
            self._not_found("RepoNotFound")
            return None
        if revision not in ("main", COMMIT):
            self._not_found("RevisionNotFound")
            return None
        return REPOS[repo]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if (files := self._repo(match[1], match[2] or "main")) is not None:
                self._json({"id": match[1], "sha": COMMIT, "siblings": [{"rfilename": f} for f in sorted(files)]})
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
            if (files := self._repo(*match.groups())) is not None:
                self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in sorted(files.items())])
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if (files := self._repo(match[1], match[2])) is None:
                return
            if match[3] not in files:
                self._not_found("EntryNotFound")
                return
            data = files[match[3]]
            self._send(200, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": COMMIT,
                                   "Content-Type": "application/octet-stream"})
        else:
            self._not_found("RepoNotFound")

    do_HEAD = do_GET


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """HF_ENDPOINT at the stand-in, the hub's cache under tmp_path, online."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    import huggingface_hub.constants as constants

    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these at import; point its module-level copies at the stand-in too
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield endpoint
    server.shutdown()
    server.server_close()


def test_download_writes_every_file_byte_for_byte(hub, tmp_path):
    out = download("openbmb/cpm-demo", out=tmp_path / "got")
    assert out == tmp_path / "got"
    for name, data in REPOS["openbmb/cpm-demo"].items():
        assert (out / name).read_bytes() == data


def test_download_into_the_cache_and_include_filters(hub, tmp_path):
    out = download("someone/only-text", include=["notes/*"])
    assert str(out).startswith(str(tmp_path / "hf-home"))
    assert (out / "notes" / "a.txt").read_bytes() == b"hello\n"
    assert not (out / "b.json").exists()


def test_a_cached_download_is_found_again_offline(hub, tmp_path, monkeypatch):
    """The cache records which commit the branch names, so HF_HUB_OFFLINE (and transformers
    offline) finds the snapshot an online download left."""
    import huggingface_hub.constants as constants

    online = download("openbmb/cpm-demo")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download("openbmb/cpm-demo") == online


def test_cli_download_without_a_config_names_no_family(hub, tmp_path, capsys):
    assert main(["download", "someone/only-text", "--out", str(tmp_path / "text")]) == 0
    printed = capsys.readouterr().out
    assert "downloaded someone/only-text" in printed and "checkpoint" not in printed and "convert" not in printed


def test_cli_download_honours_hf_endpoint_and_names_the_convert_command(hub, tmp_path):
    """A fresh process, the stand-in named only by HF_ENDPOINT (as a user would set it)."""
    out = tmp_path / "ant"
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "fresh-home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "cpmlive", "download", "openbmb/cpm-demo", "--out", str(out),
                           "--revision", COMMIT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert printed[0] == f"downloaded openbmb/cpm-demo to {out}"
    assert "CPM-Ant checkpoint" in printed[1]
    assert printed[2].strip() == f"cpmlive convert {out} cpm-demo --dtype float16"
    assert checkpoint_info(out)["parameters"] == checkpoint_info(demo_dir())["parameters"]


@pytest.mark.parametrize("argv, message", [
    (["download", "openbmb/no-such-model"], "openbmb/no-such-model: no such repository on http://"),
    (["download", "openbmb/cpm-demo", "--revision", "v9"], "openbmb/cpm-demo: no revision 'v9' on http://"),
    (["download", "openbmb/cpm-demo", "--include", "*.nothing"], "openbmb/cpm-demo: no file matches *.nothing"),
    (["download", "https://huggingface.co/openbmb/cpm-ant-10b"], "is not a Hub repository id"),
    (["download", "cpm-ant-10b"], "is not a Hub repository id"),
])
def test_cli_download_refuses_in_one_line(hub, tmp_path, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_download_offline_is_one_line(tmp_path, monkeypatch, capsys):
    """A hub that cannot be reached (a closed port) and nothing cached: one line, exit 2."""
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["download", "openbmb/cpm-ant-10b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "openbmb/cpm-ant-10b: cannot reach" in err and len(err.strip().splitlines()) == 1


def test_check_repo_id():
    assert check_repo_id("TsinghuaAI/CPM-Generate") == "TsinghuaAI/CPM-Generate"
    for bad in ("a/b/c", "../x", "x/..", "/x", "x", "a b/c", "owner/name-"):
        with pytest.raises(CpmliveError):
            check_repo_id(bad)


def test_out_that_holds_someones_files_is_refused_unless_forced(hub, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own", encoding="utf-8")
    assert main(["download", "openbmb/cpm-demo", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "config.json").read_text(encoding="utf-8") == "my own"
    (out / "config.json").unlink()
    (out / "notes.txt").write_text("kept", encoding="utf-8")
    assert main(["download", "openbmb/cpm-demo", "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text(encoding="utf-8") == "kept"
    assert (out / "config.json").read_bytes() == REPOS["openbmb/cpm-demo"]["config.json"]


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CpmliveError, match="not a directory"):
        download("openbmb/cpm-demo", out=target)

