"""A loopback stand-in for the Hugging Face Hub (read side), for offline tests.

``FakeHub`` is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 serving model and dataset repos held in memory:
every ``publish`` makes a commit (a 40-hex sha) on a branch, so a repo has revisions (branches, and every commit
by its sha). It answers what ``snapshot_download``, ``hf_hub_download``, transformers' ``from_pretrained`` and
datasets' ``load_dataset`` ask for:

    GET  /api/{models,datasets}/ORG/NAME[/revision/REV]       repo info: sha, siblings
    GET  /api/{models,datasets}/ORG/NAME/tree/REV[/PATH]      file and folder listing (?recursive=true)
    POST /api/{models,datasets}/ORG/NAME/paths-info/REV       info on given paths
    GET  /api/{models,datasets}/ORG/NAME/refs                 branches
    HEAD/GET /ORG/NAME/resolve/REV/PATH, /datasets/ORG/NAME/resolve/REV/PATH   file bytes (Range supported)

with the ``X-Repo-Commit`` / ``ETag`` / ``X-Error-Code`` headers the clients rely on. Every request is logged
(``hub.log``), so a test can assert that a file was never downloaded (``hub.downloads(name)``).

The ``fake_hub`` fixture starts one per test and points the clients at it **in this process** by patching what
huggingface_hub and datasets read at import time (``constants.ENDPOINT`` and the URL templates, the cache
folders, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``), and sets the same as environment variables
(``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ...) for subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pkl", ".pt", ".h5")  # stored with git-lfs on the real Hub
KINDS = {"models": "model", "datasets": "dataset"}
STAMP = "2026-01-01T00:00:00.000Z"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos in memory: (repo_type, repo_id) -> {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content ------------------------------------------------------------------------------------
    def publish(self, repo_id: str, files: str | Path | dict[str, bytes], revision: str = "main",
                repo_type: str = "model") -> str:
        """A commit holding exactly ``files`` (a folder, or {path in repo: bytes}) on branch ``revision``."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault((repo_type, repo_id), {"refs": {}, "commits": {}})
        h = hashlib.sha1(f"{repo_type}/{repo_id}/{revision}/{len(repo['commits'])}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = h.hexdigest()
        with self._lock:
            repo["commits"][sha] = dict(files)
            repo["refs"][revision] = sha
        return sha

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo["commits"][self._commit(repo, revision)]

    def downloads(self, name: str) -> list[str]:
        """Logged file requests (HEAD or GET of a resolve URL) for a path ending in ``name``."""
        return [line for line in self.log if "/resolve/" in line and line.split("?")[0].endswith("/" + name)]

    @staticmethod
    def _commit(repo: dict, revision: str) -> str | None:
        if revision in repo["refs"]:
            return repo["refs"][revision]
        return revision if revision in repo["commits"] else None

    # -- server ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _entries(files: dict[str, bytes], prefix: str = "", recursive: bool = True) -> list[dict]:
    """Tree entries (files with their blob id and LFS record, and folders) under ``prefix``."""
    prefix = prefix.strip("/")
    out, folders = [], set()
    for path in sorted(files):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        for k in range(1, len(parts)):
            folder = "/".join(filter(None, [prefix, *parts[:k]]))
            if (recursive or k == 1) and folder not in folders:
                folders.add(folder)
                out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                            "path": folder})
        if recursive or len(parts) == 1:
            out.append(_file_entry(path, files[path]))
    return out


def _file_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path, "lastCommit": None}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data, headers: dict | None = None) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, code: int, error_code: str, message: str, headers: dict | None = None) -> None:
            self._send(code, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": error_code,
                        "X-Error-Message": message, **(headers or {})})

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            self._route()

        def _route(self) -> None:
            hub.log.append(f"{self.command} {self.path}")
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
            query = urllib.parse.parse_qs(url.query)
            try:
                if parts == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent registry: none
                    return self._json({"standardEnvVars": [], "harnesses": {}})
                if parts[0] == "api" and len(parts) >= 4 and parts[1] in KINDS:
                    return self._api(KINDS[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:], query)
                kind = "model"
                if parts[0] == "datasets":
                    kind, parts = "dataset", parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            except BrokenPipeError:
                return
            hub.log.append(f"UNHANDLED {self.command} {self.path}")
            self._error(404, "EntryNotFound", f"{self.path}: not served by the fake Hub")

        def _repo(self, kind: str, repo_id: str):
            repo = hub.repos.get((kind, repo_id))
            if repo is None:
                self._error(401, "RepoNotFound", f"Repository not found: {repo_id}")
            return repo

        def _rev(self, kind: str, repo_id: str, revision: str):
            repo = self._repo(kind, repo_id)
            if repo is None:
                return None, None
            sha = hub._commit(repo, revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None, None
            return sha, repo["commits"][sha]

        def _api(self, kind: str, repo_id: str, rest: list[str], query: dict) -> None:
            if rest[:1] == ["refs"]:
                repo = self._repo(kind, repo_id)
                if repo is not None:
                    self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                             for b, s in repo["refs"].items()], "tags": [], "converts": []})
                return
            if rest[:1] in (["tree"], ["paths-info"]) and len(rest) >= 2:
                sha, files = self._rev(kind, repo_id, rest[1])
                if files is None:
                    return
                if rest[0] == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                    prefix = "/".join(rest[2:])
                    entries = _entries(files, prefix, recursive)
                    if prefix and prefix not in files and not entries:
                        return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rest[1]}")
                    return self._json(entries)
                form = urllib.parse.parse_qs(getattr(self, "body", b"").decode())
                paths = form.get("paths") or json.loads(getattr(self, "body", b"{}") or b"{}").get("paths", [])
                out = []
                for p in paths:
                    p = p.strip("/")
                    if p in files:
                        out.append(_file_entry(p, files[p]))
                    elif any(f.startswith(p + "/") for f in files):
                        out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0,
                                    "path": p})
                return self._json(out)
            revision = rest[1] if rest[:1] == ["revision"] and len(rest) >= 2 else "main"
            if rest and rest[:1] != ["revision"]:
                hub.log.append(f"UNHANDLED {self.command} {self.path}")
                return self._error(404, "EntryNotFound", f"{self.path}: not served by the fake Hub")
            sha, files = self._rev(kind, repo_id, revision)
            if files is None:
                return
            self._json({"id": repo_id, "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "sha": sha,
                        "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                        "tags": [], "lastModified": STAMP, "createdAt": STAMP,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})

        def _resolve(self, kind: str, repo_id: str, revision: str, path: str) -> None:
            sha, files = self._rev(kind, repo_id, revision)
            if files is None:
                return
            if path not in files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                                   {"X-Repo-Commit": sha})
            data = files[path]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
            if path.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                "X-Linked-Size": str(len(data))})
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
            if match and self.command == "GET" and data:
                start = int(match[1]) if match[1] else max(len(data) - int(match[2] or 0), 0)
                stop = min(int(match[2]) + 1 if match[1] and match[2] else len(data), len(data))
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                return self._send(206, data[start:stop], headers)
            self._send(200, data, headers)

    return Handler


def point_clients_at(url: str, home: Path, monkeypatch) -> None:
    """huggingface_hub, transformers and datasets in this process (and subprocesses, by environment) use
    ``url`` as the Hub and caches under ``home``; no stored login is seen."""
    import datasets.config
    from huggingface_hub import HfFileSystem, constants, hf_api

    hub_cache = home / "hub"
    values = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
              "HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache), "HF_TOKEN_PATH": str(home / "token"),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_OFFLINE": False,
              "HF_HUB_DISABLE_XET": True}
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    HfFileSystem.clear_instance_cache()  # fsspec keeps instances, with the endpoint of an earlier test
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache),
           "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running ``FakeHub`` that huggingface_hub, transformers and datasets talk to (caches in tmp_path)."""
    from huggingface_hub import HfFileSystem

    hub = FakeHub().start()
    point_clients_at(hub.url, tmp_path / "hf_home", monkeypatch)
    with warnings.catch_warnings():  # libraries re-enabling their bars meet HF_HUB_DISABLE_PROGRESS_BARS
        warnings.filterwarnings("ignore", message="Cannot enable progress bars", category=UserWarning)
        yield hub
    hub.stop()
    HfFileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------------------------
# The write side, mocked: HfApi.create_repo / create_branch / upload_folder
# ----------------------------------------------------------------------------------------------


class Uploads:
    """What calofm asked the Hub to do. ``staged`` keeps a copy of every uploaded folder (the original is a
    temporary folder removed after the upload); with ``hub`` set, each upload is also published there."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str, dict]] = []  # (method, repo_id, keyword arguments)
        self.staged: list[Path] = []
        self.tokens: list[str | None] = []  # HfApi(token=...) of each call: None = huggingface_hub's own lookup
        self.hub: FakeHub | None = None

    def files(self, k: int = -1) -> list[str]:
        """The files of the k-th uploaded folder, relative, sorted."""
        root = self.staged[k]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def patch(self, monkeypatch) -> None:
        import shutil
        from types import SimpleNamespace

        from huggingface_hub import HfApi

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            self.tokens.append(api.token)
            return f"https://hub.invalid/{repo_id}"

        def create_branch(api, repo_id, **kw):
            self.calls.append(("create_branch", repo_id, kw))
            self.tokens.append(api.token)

        def upload_folder(api, *, folder_path, repo_id, **kw):
            self.calls.append(("upload_folder", repo_id, kw))
            self.tokens.append(api.token)
            copy = self.root / f"upload_{len(self.staged)}"
            shutil.copytree(folder_path, copy)
            self.staged.append(copy)
            sha = "0" * 40
            if self.hub is not None:
                sha = self.hub.publish(repo_id, copy, revision=kw.get("revision") or "main",
                                       repo_type=kw.get("repo_type") or "model")
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{sha}", oid=sha)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture
def uploads(tmp_path, monkeypatch):
    """HfApi's write calls mocked (nothing leaves the machine); see ``Uploads``."""
    record = Uploads(tmp_path / "uploads")
    record.root.mkdir()
    record.patch(monkeypatch)
    return record


def seed_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main", repo_type: str = "model") -> str:
    """Lay ``folder`` out in a Hub cache as huggingface_hub does (blobs, refs/<revision>, snapshots/<commit>),
    without any server: the conventional offline fixture. Returns the commit."""
    import os

    root = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files) + repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = root / "blobs" / (hashlib.sha256(data).hexdigest() if path.name.endswith(LFS_SUFFIXES)
                                 else git_blob_id(data))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit
