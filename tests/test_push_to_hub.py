"""push_to_hub end to end, against the loopback fake Hub in tests/fake_hub.py.

The Hub-talking parts run in child processes: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and
HF_HOME once, at import, and this test session runs offline (conftest.py). Each child gets the fake
Hub's endpoint, a fake token, its own fresh HF_HOME (so the pull really downloads) and no offline
flag.

1. A push child builds a model with a named builder, calls `model.push_to_hub(repo_id)`, reloads it
   by repo id through the registered classes and saves the logits of both.
2. A pull child, where `s4bt_hf` cannot be imported, loads the repo with `trust_remote_code=True`
   through the code that was pushed next to the weights.

This checks the real transformers/huggingface_hub client code against our model of the Hub
protocol, not against the real Hub.
"""

import base64
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, git_blob_sha1
from hidden_package import HIDE_S4BT_HF

REPO_ID = "me/s4dss-tiny"
CODE_FILES = {
    "configuration_s4dss.py", "modeling_s4dss.py", "kernel_s4dss.py", "initialization_s4dss.py",
    "balanced_truncation.py", "compression.py", "compression_report.py", "model_card.py",
}  # fmt: skip
COMPRESSED_REPO_ID = "me/s4dss-tiny-bt"
EXPECTED_FILES = {"config.json", "model.safetensors", "README.md"} | CODE_FILES
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_s4dss.S4DSSConfig",
    "AutoModel": "modeling_s4dss.S4DSSModel",
    "AutoModelForSequenceClassification": "modeling_s4dss.S4DSSForSequenceClassification",
    "AutoModelForAudioClassification": "modeling_s4dss.S4DSSForSequenceClassification",
}
# Variables that would make a child offline, send it through a proxy, or make it share a cache.
_DROPPED_ENV = {
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_ENDPOINT", "HF_TOKEN",
}  # fmt: skip

# --------------------------------------------------------------------------- child scripts

PUSH_SCRIPT = textwrap.dedent(
    r'''
    """Build a model with the builder named in argv, push it, reload it by repo id (registered
    classes) and save both models' logits and state dicts."""
    import json
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification

    import s4bt_hf


    def build_tiny(d_state=4):
        torch.manual_seed(0)
        config = s4bt_hf.S4DSSConfig(vocab_size=12, d_model=8, n_layers=2, d_state=d_state, num_labels=3)
        model = s4bt_hf.S4DSSForSequenceClassification(config)
        # O(1) classifier weights, so the logits are O(1) and comparing them means something.
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator))
        return model.eval()


    def build_compressed():
        return build_tiny(d_state=8).balanced_truncate(rank=3)


    # One entry per kind of model to push.
    BUILDERS = {"tiny": build_tiny, "compressed": build_compressed}

    def report_of(model):
        return None if model.compression_report is None else model.compression_report.to_dict()


    builder, repo_id, input_path, output_path = sys.argv[1:5]
    model = BUILDERS[builder]()
    commit = model.push_to_hub(repo_id)
    reloaded = AutoModelForSequenceClassification.from_pretrained(repo_id, dtype=torch.float32)

    input_ids = torch.load(input_path)
    with torch.no_grad():
        pushed_logits = model(input_ids=input_ids).logits
        reloaded_logits = reloaded(input_ids=input_ids).logits
    torch.save(
        {
            "pushed_logits": pushed_logits,
            "reloaded_logits": reloaded_logits,
            "pushed_state": model.state_dict(),
            "reloaded_state": reloaded.state_dict(),
        },
        output_path,
    )
    with open(output_path + ".json", "w") as handle:
        json.dump(
            {
                "commit_oid": commit.oid,
                "repo_url": str(commit.repo_url),
                "reloaded_class": type(reloaded).__name__,
                "reloaded_report": report_of(reloaded),
                "pushed_report": report_of(model),
                "reloaded_module": type(reloaded).__module__,
            },
            handle,
        )
    '''
)

# HIDE_S4BT_HF makes s4bt_hf unimportable and defines `found_before`.
PULL_SCRIPT = HIDE_S4BT_HF + textwrap.dedent(
    r'''
    """Load the repo through its pushed code and save the logits."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    repo_id, input_path, output_path = sys.argv[1:4]
    model = AutoModelForSequenceClassification.from_pretrained(repo_id, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.load(input_path)).logits
    torch.save({"logits": logits, "state": model.state_dict()}, output_path)
    with open(output_path + ".json", "w") as handle:
        json.dump(
            {
                "found_before": found_before,
                "s4bt_hf_imported": any(name.split(".")[0] == "s4bt_hf" for name in sys.modules),
                "class": type(model).__name__,
                "module": type(model).__module__,
            },
            handle,
        )
    '''
)


def _run_child(hub, workdir, name, script, *args, keep_pythonpath=True):
    """Run `script` in a fresh Python process that talks to `hub`; return its own HF_HOME."""
    workdir.mkdir(parents=True, exist_ok=True)
    script_path = workdir / f"{name}.py"
    script_path.write_text(script)
    hf_home = workdir / f"{name}_hf_home"
    hf_home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DROPPED_ENV and not key.lower().endswith("_proxy") and (keep_pythonpath or key != "PYTHONPATH")
    }
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_fake", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run(
        [sys.executable, str(script_path), *map(str, args)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, (
        f"{name} child failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n"
        "FakeHub requests:\n" + "\n".join(hub.requests)
    )
    return hf_home


def push(hub, workdir, builder="tiny", repo_id=REPO_ID):
    """Push the model `builder` makes (see BUILDERS in PUSH_SCRIPT) to `repo_id` on `hub`.

    Returns {"input_path": the saved input ids (vocabulary 12, as in the builders), "results": the
    logits and state dicts of the pushed and the reloaded model, "report": what the child saw}."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 12, (3, 16), generator=generator)
    torch.save(input_ids, workdir / "input_ids.pt")
    output = workdir / f"push_{builder}.pt"
    _run_child(hub, workdir, f"push_{builder}", PUSH_SCRIPT, builder, repo_id, workdir / "input_ids.pt", output)
    report = json.loads(Path(f"{output}.json").read_text())
    return {"input_path": workdir / "input_ids.pt", "results": torch.load(output), "report": report}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as fake_hub:
        yield fake_hub


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """The tiny model, pushed once for the whole module."""
    return push(hub, tmp_path_factory.mktemp("push"))


def _assert_state_dicts_equal(expected, actual):
    assert set(expected) == set(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# --------------------------------------------------------------------------- tests


def test_push_uploads_weights_code_and_card(hub, pushed):
    assert not hub.unhandled, "the client used endpoints FakeHub does not serve:\n" + "\n".join(hub.unhandled)
    files = hub.files(REPO_ID)
    assert EXPECTED_FILES <= set(files), sorted(files)
    assert pushed["report"]["commit_oid"] == hub.head(REPO_ID)
    assert pushed["report"]["repo_url"] == f"{hub.endpoint}/{REPO_ID}"

    config = json.loads(files["config.json"])
    assert config["model_type"] == "s4dss"
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    assert config["architectures"] == ["S4DSSForSequenceClassification"]

    # The pushed code is the package's code, verbatim.
    import s4bt_hf

    package_dir = Path(s4bt_hf.__file__).parent
    for name in CODE_FILES:
        assert files[name] == (package_dir / name).read_bytes(), name

    # push_to_hub writes this package's model card (the repo had no README.md yet).
    readme = files["README.md"].decode("utf-8")
    assert readme.startswith("---\n") and "library_name: transformers" in readme
    assert "<!-- generated by s4bt_hf" in readme and "S4DSSForSequenceClassification" in readme
    assert "Not compressed." in readme and "compression_report.json" not in files


def test_reload_by_repo_id_gives_identical_logits(pushed):
    report, results = pushed["report"], pushed["results"]
    # The registered classes of the installed package, not remote code.
    assert report["reloaded_class"] == "S4DSSForSequenceClassification"
    assert report["reloaded_module"] == "s4bt_hf.modeling_s4dss"
    _assert_state_dicts_equal(results["pushed_state"], results["reloaded_state"])
    assert torch.equal(results["reloaded_logits"], results["pushed_logits"])
    assert results["pushed_logits"].abs().max() > 0.1  # O(1) logits: the comparison discriminates


def test_remote_code_from_the_hub_without_the_package(hub, pushed, tmp_path):
    output = tmp_path / "pull.pt"
    hf_home = _run_child(
        hub, tmp_path, "pull", PULL_SCRIPT, REPO_ID, pushed["input_path"], output, keep_pythonpath=False
    )
    report = json.loads(Path(f"{output}.json").read_text())
    assert report["found_before"], "s4bt_hf was not importable to begin with: the hiding was not tested"
    assert not report["s4bt_hf_imported"]
    assert report["class"] == "S4DSSForSequenceClassification"
    assert report["module"].startswith("transformers_modules."), report["module"]
    # The code came from the fake Hub into the child's own HF_HOME.
    assert (hf_home / "modules" / "transformers_modules").is_dir()
    downloaded = {line.rsplit("/", 1)[-1].split()[0] for line in hub.requests if line.startswith("GET /me/")}
    assert CODE_FILES <= downloaded, sorted(downloaded)

    results = torch.load(output)
    _assert_state_dicts_equal(pushed["results"]["pushed_state"], results["state"])
    assert torch.equal(results["logits"], pushed["results"]["pushed_logits"])


@pytest.fixture(scope="module")
def pushed_compressed(hub, tmp_path_factory):
    """A balanced-truncated model (d_state 8 -> rank 3), pushed once for the whole module."""
    return push(hub, tmp_path_factory.mktemp("push_bt"), builder="compressed", repo_id=COMPRESSED_REPO_ID)


def test_compressed_model_push_holds_report_and_card_and_reloads(hub, pushed_compressed, tmp_path):
    files = hub.files(COMPRESSED_REPO_ID)
    assert EXPECTED_FILES | {"compression_report.json"} <= set(files), sorted(files)
    assert json.loads(files["config.json"])["d_state"] == 3
    report = json.loads(files["compression_report.json"])
    assert [layer["rank"] for layer in report["layers"]] == [3, 3]
    assert report["ssm_parameters_after"] < report["ssm_parameters_before"]
    readme = files["README.md"].decode("utf-8")
    assert "Balanced truncation" in readme and "8 → 3" in readme

    assert pushed_compressed["report"]["reloaded_report"] == pushed_compressed["report"]["pushed_report"] is not None
    results = pushed_compressed["results"]
    _assert_state_dicts_equal(results["pushed_state"], results["reloaded_state"])
    assert torch.equal(results["reloaded_logits"], results["pushed_logits"])

    output = tmp_path / "pull_bt.pt"
    _run_child(hub, tmp_path, "pull_bt", PULL_SCRIPT, COMPRESSED_REPO_ID, pushed_compressed["input_path"], output,
               keep_pythonpath=False)
    pulled = torch.load(output)
    assert json.loads(Path(f"{output}.json").read_text())["module"].startswith("transformers_modules.")
    _assert_state_dicts_equal(results["pushed_state"], pulled["state"])
    assert torch.equal(pulled["logits"], results["pushed_logits"])


def _request(hub, method, path, body=None, token="hf_fake"):
    """One raw request to `hub` (no proxies); returns (status, headers, body bytes)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(hub.endpoint + path, data=body, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_fake_hub_protocol_and_readable_errors(tmp_path):
    """The fake itself, without a client: a commit lands in the folder and is served back with the
    headers the client needs; missing things and unknown requests get readable answers."""
    with FakeHub(tmp_path) as fake:
        create = json.dumps({"name": "model", "organization": "me"}).encode()
        assert _request(fake, "POST", "/api/repos/create", create, token=None)[0] == 401
        assert _request(fake, "POST", "/api/repos/create", create)[0] == 200
        status, _, body = _request(fake, "POST", "/api/repos/create", create)
        assert status == 409 and json.loads(body)["url"] == f"{fake.endpoint}/me/model"

        lines = [
            {"key": "header", "value": {"summary": "add", "description": ""}},
            {
                "key": "file",
                "value": {"path": "a/b.txt", "content": base64.b64encode(b"hi").decode(), "encoding": "base64"},
            },
        ]
        ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        status, _, body = _request(fake, "POST", "/api/models/me/model/commit/main", ndjson)
        assert status == 200
        sha = json.loads(body)["commitOid"]
        assert sha == fake.head("me/model") and len(sha) == 40
        assert (tmp_path / "me" / "model" / "a" / "b.txt").read_bytes() == b"hi"

        status, headers, body = _request(fake, "GET", "/me/model/resolve/main/a%2Fb.txt")
        assert (status, body, headers["X-Repo-Commit"]) == (200, b"hi", sha)
        assert headers["ETag"].strip('"') == git_blob_sha1(b"hi")
        status, headers, body = _request(fake, "HEAD", "/me/model/resolve/main/a/b.txt")
        assert (status, headers["Content-Length"], body) == (200, "2", b"")
        info = json.loads(_request(fake, "GET", f"/api/models/me/model/revision/{sha}")[2])
        assert info["sha"] == sha and [s["rfilename"] for s in info["siblings"]] == ["a/b.txt"]

        for path, code in [
            ("/me/model/resolve/main/missing.json", "EntryNotFound"),
            ("/me/model/resolve/v9/a/b.txt", "RevisionNotFound"),
            ("/me/nothing/resolve/main/a/b.txt", "RepoNotFound"),
            ("/api/models/me/nothing", "RepoNotFound"),
        ]:
            status, headers, _ = _request(fake, "HEAD", path) if "resolve" in path else _request(fake, "GET", path)
            assert (status, headers["X-Error-Code"]) == (404, code), path
        assert not fake.unhandled

        status, _, body = _request(fake, "GET", "/api/spaces/me/model")
        assert status == 404 and "FakeHub has no endpoint for GET /api/spaces/me/model" in json.loads(body)["error"]
        status, _, body = _request(fake, "DELETE", "/api/models/me/model")
        assert status == 501 and "does not implement DELETE" in json.loads(body)["error"]
        assert fake.unhandled == ["GET /api/spaces/me/model -> 404", "DELETE /api/models/me/model -> 501"]

    # A new hub on the same folder serves the same files.
    with FakeHub(tmp_path) as again:
        assert again.files("me/model") == {"a/b.txt": b"hi"}
