"""A small fake Hugging Face Hub on the loopback interface, for testing `push_to_hub` and
`from_pretrained("org/name")` without internet. Standard library only.

It speaks just enough of the Hub's HTTP protocol for `huggingface_hub` 2.x (as used by
transformers 5.x) to create a model repo, commit small files inline ("regular" upload mode: no LFS,
no Xet) and download them again:

    POST      /api/repos/create                          create a repo (409 if it exists)
    POST      /api/validate-yaml                         accept any README.md metadata
    POST      /api/models/{repo}/preupload/{rev}         every file is "regular" (content inline)
    POST      /api/models/{repo}/commit/{rev}            NDJSON commit, base64 file contents
    GET       /api/models/{repo}[/revision/{rev}]        model info: sha and siblings
    HEAD|GET  /{repo}/resolve/{rev}/{path}               file bytes, X-Repo-Commit and ETag headers

Missing repos, revisions and files answer 404 with the `X-Error-Code` header the client turns into
`RepositoryNotFoundError`, `RevisionNotFoundError` or `EntryNotFoundError`. Any other request
answers 501 (or 404 for an unknown path) with a JSON `error` message, and is printed to stderr and
recorded in `FakeHub.unhandled`, so that a change in the client's protocol shows up as a readable
failure instead of a hang or a confusing traceback.

This is our model of an undocumented protocol, not the real Hub: it checks that the client-side
code paths work end to end, not that the real Hub accepts what they send.

Usage:

    with FakeHub() as hub:              # or FakeHub(folder) to keep the repos in a folder
        env["HF_ENDPOINT"] = hub.endpoint
        ...                             # push and pull in a subprocess
        hub.files("me/model")           # {"config.json": b"...", ...}

Only the default branch (`main`) can be written; any commit sha can be read. Only model repos are
served. Revisions are passed URL-quoted by the client and are unquoted here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import threading
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"

_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    # (method, path regex, handler method name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "model_info"),
    ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as the ETag / oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: HTTP status, the `X-Error-Code` header (None for none), a message, extra
    headers and JSON fields, and whether the request is one the fake does not implement (these are
    logged)."""

    def __init__(self, status, code, message, headers=None, *, extra=None, unhandled=False):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        self.unhandled = unhandled or status == 501


class _Repo:
    """One model repo: its commits (sha -> {path: bytes}) and the head of the default branch."""

    def __init__(self, repo_id: str, files: dict[str, bytes] | None = None):
        self.repo_id = repo_id
        self.commits: dict[str, dict[str, bytes]] = {}
        self.head = self._add_commit(None, "initial commit", dict(files or {}))

    def _add_commit(self, parent: str | None, summary: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(f"{self.repo_id}\n{parent}\n{summary}\n{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = files
        return sha

    def commit(self, summary: str, files: dict[str, bytes]) -> str:
        self.head = self._add_commit(self.head, summary, files)
        return self.head

    def resolve(self, revision: str) -> str:
        """The commit sha a revision (branch name or full sha) points to."""
        if revision == DEFAULT_BRANCH:
            return self.head
        if revision in self.commits:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


class FakeHub:
    """A threaded loopback HTTP server that plays the Hugging Face Hub; see the module docstring.

    `folder`: if given, repos found there (`folder/org/name/...`) are served, and each commit
    rewrites `folder/org/name/` with the new files. Otherwise the repos live only in memory.
    `token`: if not None, write requests must carry `Authorization: Bearer <token>`.
    """

    def __init__(self, folder: str | Path | None = None, *, token: str | None = "hf_fake"):
        self.folder = Path(folder) if folder is not None else None
        self.token = token
        self.requests: list[str] = []  # "METHOD /path -> status", in order
        self.unhandled: list[str] = []  # the subset the fake does not implement
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if self.folder is not None:
            self._load_folder()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running: use `with FakeHub() as hub:` or call start().")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ inspection
    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """The files of `repo_id` at `revision`, as {path: bytes}."""
        with self._lock:
            repo = self._repos[repo_id]
            return dict(repo.commits[repo.resolve(revision)])

    def head(self, repo_id: str) -> str:
        """The commit sha of the default branch."""
        with self._lock:
            return self._repos[repo_id].head

    # ------------------------------------------------------------------ storage
    def _load_folder(self) -> None:
        for repo_dir in sorted(p for p in self.folder.glob("*/*") if p.is_dir()):
            files = {
                path.relative_to(repo_dir).as_posix(): path.read_bytes()
                for path in sorted(repo_dir.rglob("*"))
                if path.is_file()
            }
            repo_id = repo_dir.relative_to(self.folder).as_posix()
            self._repos[repo_id] = _Repo(repo_id, files)

    def _write_folder(self, repo: _Repo) -> None:
        if self.folder is None:
            return
        repo_dir = self.folder / repo.repo_id
        shutil.rmtree(repo_dir, ignore_errors=True)
        repo_dir.mkdir(parents=True)
        for path, data in repo.commits[repo.head].items():
            target = repo_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def _repo(self, repo_id: str) -> _Repo:
        try:
            return self._repos[repo_id]
        except KeyError:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}") from None

    def _writable_repo(self, repo_id: str, revision: str) -> _Repo:
        repo = self._repo(repo_id)
        if revision != DEFAULT_BRANCH:
            raise HubError(404, "RevisionNotFound", f"FakeHub only writes to '{DEFAULT_BRANCH}', not '{revision}'")
        return repo

    def _record(self, line: str, unhandled: bool) -> None:
        with self._lock:
            self.requests.append(line)
            if unhandled:
                self.unhandled.append(line)
        if unhandled:
            print(f"FakeHub: unhandled request {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ endpoints
    # Each takes (body, query, **path groups) and returns (status, headers, payload); payload is
    # bytes, or anything else to be sent as JSON. They run under self._lock.

    def create_repo(self, body, query):
        request = json.loads(body or b"{}")
        if request.get("type", "model") != "model":
            raise HubError(501, None, f"FakeHub serves model repos only, not {request['type']!r}")
        name, organization = request.get("name"), request.get("organization")
        if not name or not organization:
            raise HubError(400, None, "FakeHub needs repo ids of the form 'org/name'")
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            # `create_repo(exist_ok=True)` swallows the 409 but still reads "url" from the body.
            raise HubError(409, None, "You already created this model repo", extra={"url": url})
        self._repos[repo_id] = _Repo(repo_id)
        self._write_folder(self._repos[repo_id])
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, body, query):
        return 200, {}, {"errors": [], "warnings": []}

    def preupload(self, body, query, repo, rev):
        if "create_pr" in query:
            raise HubError(501, None, "FakeHub does not implement pull requests (create_pr)")
        target = self._writable_repo(repo, rev)
        files = target.commits[target.head]
        answer = []
        for entry in json.loads(body)["files"]:
            path = entry["path"]
            oid = git_blob_sha1(files[path]) if path in files else None
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": answer}

    def commit(self, body, query, repo, rev):
        if "create_pr" in query:
            raise HubError(501, None, "FakeHub does not implement pull requests (create_pr)")
        target = self._writable_repo(repo, rev)
        files = dict(target.commits[target.head])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != target.head:
                    raise HubError(412, None, f"parentCommit {parent} is not the head of '{DEFAULT_BRANCH}'")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, None, f"FakeHub expects base64 file contents, got {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:  # "lfsFile" (preupload never asks for LFS) or something new
                raise HubError(501, None, f"FakeHub does not implement commit operations of kind {key!r}")
        sha = target.commit(summary, files)
        self._write_folder(target)
        return 200, {}, {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{sha}"}

    def model_info(self, body, query, repo, rev=None):
        target = self._repo(repo)
        sha = target.resolve(rev or DEFAULT_BRANCH)
        files = target.commits[sha]
        siblings = [
            {"rfilename": path, "size": len(files[path]), "blobId": git_blob_sha1(files[path])}
            for path in sorted(files)
        ]
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        organization = repo.split("/")[0]
        return 200, {}, {
            "_id": sha[:24], "id": repo, "modelId": repo, "author": organization, "sha": sha,
            "private": False, "gated": False, "disabled": False, "lastModified": now,
            "tags": [], "downloads": 0, "likes": 0, "siblings": siblings,
        }  # fmt: skip

    def resolve(self, body, query, repo, rev, path):
        target = self._repo(repo)
        sha = target.resolve(rev)
        data = target.commits[sha].get(path)
        if data is None:
            # The real Hub names the commit even when the file is missing; the client caches that.
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", {"X-Repo-Commit": sha})
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha1(data)}"',
        }
        return 200, headers, data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length
    server_version = "FakeHub/1.0"

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def log_message(self, *args):
        pass  # FakeHub.requests has the log; keep pytest output clean

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, up to the blank line
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self):
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        body = self._read_body()
        line = f"{self.command} {url.path}"
        try:
            handler, groups = self._route(url.path)
            if self.command == "POST" and hub.token is not None:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    raise HubError(401, None, "Invalid credentials in Authorization header")
            with hub._lock:
                status, headers, payload = getattr(hub, handler)(body, parse_qs(url.query), **groups)
        except HubError as error:
            hub._record(f"{line} -> {error.status}", unhandled=error.unhandled)
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers.setdefault("X-Error-Message", error.message)
            self._send(error.status, headers, {"error": error.message, **error.extra})
            return
        except Exception as error:  # a bug in the fake, or a request it cannot parse: say so
            hub._record(f"{line} -> 500 ({type(error).__name__}: {error})", unhandled=True)
            self._send(500, {}, {"error": f"FakeHub failed on {line}: {type(error).__name__}: {error}"})
            return
        hub._record(f"{line} -> {status}", unhandled=False)
        self._send(status, headers, payload)

    def _route(self, path: str) -> tuple[str, dict[str, str]]:
        methods_for_path = []
        for method, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if match:
                if method == self.command:
                    # The client URL-quotes revisions and file paths.
                    return handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                methods_for_path.append(method)
        if methods_for_path:
            raise HubError(501, None, f"FakeHub does not implement {self.command} {path}")
        # An unknown path is a 404, as on the real Hub; the client shows our message with it.
        raise HubError(404, None, f"FakeHub has no endpoint for {self.command} {path}", unhandled=True)

    def _send(self, status: int, headers: dict[str, str], payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            # Header values are latin-1 on the wire; messages may quote arbitrary request paths.
            self.send_header(name, value.encode("ascii", "backslashreplace").decode("ascii"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
