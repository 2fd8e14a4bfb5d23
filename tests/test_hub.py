"""oner-push without the network: the staged folder loads back; a test double stands in for HfApi."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import SpaceCard

from oner import hub
from oner.hub import PushError, pin_revision, push_folder

TOKEN = "hf_secretTESTtoken0123456789"


class FakeCommit:
    oid = "0123456789abcdef0123456789abcdef01234567"


class FakeHfApi:
    """Records every call; loads the staged model folder back as a user would, while it exists."""

    def __init__(self, private_repos=()):
        self.calls = []
        self.loaded = None
        self.private_repos = set(private_repos)  # repos that already exist as private

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if kw.get("private"):
            self.private_repos.add(repo_id)
        return f"https://huggingface.co/{repo_id}"

    def model_info(self, repo_id, **kw):
        return SimpleNamespace(id=repo_id, private=repo_id in self.private_repos)

    def add_space_variable(self, repo_id, key, value, **kw):
        self.calls.append(("add_space_variable", repo_id, {"key": key, "value": value, **kw}))

    def add_space_secret(self, repo_id, key, value, **kw):
        self.calls.append(("add_space_secret", repo_id, {"key": key, "value": value, **kw}))

    def upload_folder(self, *, folder_path, repo_id, repo_type, **kw):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {"repo_type": repo_type, "files": files, **kw}))
        if repo_type == "model":
            from transformers import AutoModel, AutoProcessor

            model = AutoModel.from_pretrained(folder_path, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(folder_path, trust_remote_code=True)
            self.loaded = (type(model).__name__, type(processor).__name__)
        else:
            self.space_card = SpaceCard.load(folder / "README.md")
        return FakeCommit()

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kw):
        self.calls.append(("upload_file", repo_id, {"path_in_repo": path_in_repo,
                                                    "text": Path(path_or_fileobj).read_text(), **kw}))


@pytest.fixture
def model_folder(tiny_model_dir):
    from oner.model_card import write_model_card

    write_model_card(tiny_model_dir, {}, {"repo_id": "someone/oner-tiny"})
    (tiny_model_dir / "checkpoint-5").mkdir()
    (tiny_model_dir / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    (tiny_model_dir / "training_state.pt").write_bytes(b"state")
    return tiny_model_dir


def test_push_uploads_a_folder_that_loads_back(model_folder):
    api = FakeHfApi()
    url = push_folder(model_folder, "someone/oner-tiny", private=True, token=TOKEN, api=api)
    assert url == "https://huggingface.co/someone/oner-tiny"
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "upload_folder", "upload_file"]
    _, repo, kw = api.calls[0]
    assert repo == "someone/oner-tiny" and kw["repo_type"] == "model" and kw["private"] and kw["exist_ok"]
    _, repo, up = api.calls[1]
    assert repo == "someone/oner-tiny" and up["repo_type"] == "model" and up["token"] == TOKEN
    for f in ("config.json", "model.safetensors", "modeling_oner.py", "configuration_oner.py",
              "processing_oner.py", "processor_config.json", "tokenizer.json", "README.md"):
        assert f in up["files"], f
    assert not any("checkpoint" in f or f.endswith(".pt") for f in up["files"])
    assert api.loaded[0] == "OneRModel" and "Processor" in api.loaded[1]
    _, _, pinned = api.calls[2]
    assert pinned["path_in_repo"] == "README.md" and f'revision = "{FakeCommit.oid}"' in pinned["text"]


def test_push_with_space_points_the_space_at_the_model(model_folder):
    api = FakeHfApi()
    push_folder(model_folder, "someone/oner-tiny", token=TOKEN, space_id="someone/oner-demo", api=api)
    space_calls = [c for c in api.calls if c[1] == "someone/oner-demo"]
    kinds = [c[0] for c in space_calls]
    # configured before its files go up, so the first build already serves the pinned model
    assert kinds == ["create_repo", "add_space_variable", "add_space_variable", "upload_folder"]
    assert space_calls[0][2]["repo_type"] == "space" and space_calls[0][2]["space_sdk"] == "gradio"
    assert space_calls[-1][2]["repo_type"] == "space" and "app.py" in space_calls[-1][2]["files"]
    variables = {c[2]["key"]: c[2]["value"] for c in space_calls if c[0] == "add_space_variable"}
    # pinned to the commit that holds the model's weights and code (the one the card's snippets name)
    assert variables == {"ONER_MODEL": "someone/oner-tiny", "ONER_MODEL_REVISION": FakeCommit.oid}
    assert "add_space_secret" not in kinds  # a public model needs no token
    assert api.space_card.data.models == ["someone/oner-tiny"] and api.space_card.data.sdk == "gradio"
    # the project's own space/README.md is left untouched
    assert "someone/oner-tiny" not in (hub.SPACE_DIR / "README.md").read_text()


@pytest.mark.parametrize("flag,already_private", [(True, ()), (False, ("someone/oner-tiny",))])
def test_space_of_a_private_model_gets_the_token_as_a_secret(model_folder, flag, already_private):
    api = FakeHfApi(private_repos=already_private)
    push_folder(model_folder, "someone/oner-tiny", private=flag, token=TOKEN, space_id="someone/oner-demo", api=api)
    space_calls = [c for c in api.calls if c[1] == "someone/oner-demo"]
    secrets = [c[2] for c in space_calls if c[0] == "add_space_secret"]
    assert [(s["key"], s["value"]) for s in secrets] == [("HF_TOKEN", TOKEN)]
    assert [c[0] for c in space_calls].index("add_space_secret") < [c[0] for c in space_calls].index("upload_folder")
    assert not [c for c in api.calls if c[0] == "add_space_secret" and c[1] != "someone/oner-demo"]


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "bad name!", "-leading/x"])
def test_invalid_repo_id_fails_before_any_request(model_folder, repo_id):
    api = FakeHfApi()
    with pytest.raises(PushError, match="repo id"):
        push_folder(model_folder, repo_id, token=TOKEN, api=api)
    assert api.calls == []


def test_no_token_fails_before_any_request(model_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    api = FakeHfApi()
    with pytest.raises(PushError, match="no Hugging Face token"):
        push_folder(model_folder, "someone/oner-tiny", api=api)
    assert api.calls == []


def test_incomplete_folder_fails_before_any_request(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    api = FakeHfApi()
    with pytest.raises(PushError, match="missing"):
        push_folder(tmp_path, "someone/x", token=TOKEN, api=api)
    assert api.calls == []


def test_cli_never_prints_the_token(model_folder, monkeypatch, capsys):
    api = FakeHfApi()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    assert hub.main([str(model_folder), "someone/oner-tiny"]) == 0
    out = capsys.readouterr()
    assert "someone/oner-tiny" in out.out and TOKEN not in out.out + out.err
    assert api.calls[1][2]["token"] == TOKEN  # taken from HF_TOKEN


def test_cli_writes_the_card_a_finished_run_would_have_written(tiny_model_dir, monkeypatch, capsys):
    api = FakeHfApi()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    summary = {"preset": "tiny", "objective": "xmc+cmc", "steps": 7, "train_data": "my-shards-{0..3}.tar"}
    (tiny_model_dir / "training_summary.json").write_text(json.dumps(summary))
    assert not (tiny_model_dir / "README.md").exists()
    assert hub.main([str(tiny_model_dir), "someone/oner-tiny"]) == 0
    card = (tiny_model_dir / "README.md").read_text()
    assert "my-shards-{0..3}.tar" in card  # oner.model_folder.complete_folder wrote it from the summary
    uploaded = next(c for c in api.calls if c[0] == "upload_folder")[2]["files"]
    assert "README.md" in uploaded
    assert "pushed" in capsys.readouterr().out


def test_cli_bad_repo_id_exits_2(model_folder, capsys):
    assert hub.main([str(model_folder), "not a repo", "--space", "x/y"]) == 2
    assert "invalid repo id" in capsys.readouterr().err


def test_pin_revision_rewrites_both_snippets():
    text = 'revision = "main"  # pin\nclassifier = pipeline("zero-shot-image-classification", model="a/b", revision="main",\n  x=1)\n'
    pinned = pin_revision(text, "c0ffee")
    assert pinned.count('"c0ffee"') == 2 and '"main"' not in pinned
