"""The rendered model card parses with ModelCard.load and carries exactly the numbers it was given."""

import pytest
from huggingface_hub import ModelCard

from oner.model_card import write_model_card

METRICS = {
    "retrieval_openmoji": {"i2t_R@1": 0.1234, "t2i_R@1": 0.0987, "chance_i2t_R@1": 0.0011,
                           "chance_t2i_R@1": 0.0005, "n_images": 1850, "n_captions": 3700},
    "pointing_game": {"pointing_accuracy": 0.4567, "chance_pointing_accuracy": 0.3311, "n_queries": 1203},
    "_meta": {"suites": {
        "retrieval_openmoji": {"kind": "retrieval", "dataset": "oner-embedded/openmoji (held-out style)",
                               "description": "image<->text R@1/5/10 on OpenMoji renders"},
        "pointing_game": {"kind": "localization", "dataset": "oner-embedded/composites",
                          "description": "argmax patch inside the box"}}},
}
TRAINING = {"preset": "tiny", "objective": "xmc+cmc", "steps": 4321, "wall_time_s": 612.5,
            "data": "embedded:twemoji", "repo_id": "someone/oner-test", "revision": "abc123def"}


@pytest.fixture
def card(tiny_model_dir):
    path = write_model_card(tiny_model_dir, METRICS, TRAINING)
    assert path == tiny_model_dir / "README.md"
    return ModelCard.load(path)


def test_metadata_and_model_index(card):
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.license and data.datasets and "oner" in data.tags
    got = {(r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {("retrieval_openmoji", "i2t_R@1"): 0.1234, ("retrieval_openmoji", "t2i_R@1"): 0.0987,
                   ("pointing_game", "pointing_accuracy"): 0.4567}  # chance levels and counts stay out
    tasks = {r.dataset_config: r.task_type for r in data.eval_results}
    assert tasks["pointing_game"] == "zero-shot-object-localization"


def test_body_has_usage_recipe_limitations_citation_attribution(card):
    text = card.text
    assert 'trust_remote_code=True' in text and 'revision = "abc123def"' in text and "someone/oner-test" in text
    assert "| steps | 4321 |" in text and "| objective | xmc+cmc |" in text and "| wall time s | 612.5 |" in text
    assert "| retrieval_openmoji | i2t_R@1 | 12.3 | 0.1 |" in text  # measured value beside its chance level
    assert "## Limitations" in text and "Unifying Vision-Language Representation Space" in text
    assert "CC-BY 4.0" in text and "CC BY-SA 4.0" in text and "Twemoji" in text and "OpenMoji" in text


def test_architecture_comes_from_the_folder(card, tiny_model_dir):
    import json

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert f"width {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers" in card.text


def test_no_results_no_training_still_parses(tiny_model_dir):
    card = ModelCard.load(write_model_card(tiny_model_dir, {}, {}))
    assert not card.data.eval_results
    assert "No evaluation results were given." in card.text
    assert "No training information was given" in card.text


def test_card_states_the_weights_licence_and_the_data_licences(card):
    assert card.data.license == "apache-2.0"
    licence = card.text.split("## Licence", 1)[1].split("\n## ", 1)[0]
    assert "weights and the code in this repository are released under the **Apache License 2.0**" in " ".join(
        licence.split()
    )
    for data_licence in ("CC-BY 4.0", "CC BY-SA 4.0", "BSD-3-Clause", "Unicode License"):
        assert data_licence in licence, data_licence


def test_repository_has_the_apache_2_licence_its_metadata_names():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()


def test_usage_example_runs(card, tiny_model_dir, tmp_path, monkeypatch):
    """The card's first Python block, run as written with its repository pointed at the local folder."""
    import re

    from PIL import Image

    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert 'repo = "someone/oner-test"' in code
    code = code.replace('repo = "someone/oner-test"', f"repo = {str(tiny_model_dir)!r}")
    code = code.replace('revision = "abc123def"', "revision = None")  # a local folder has no commits
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), "red").save("emoji.png")
    scope = {}
    exec(code, scope)
    config = scope["model"].config
    assert scope["probs"].shape == (1, 3)
    assert scope["joint"].shape == (1, config.projection_dim)
    assert scope["patches"].shape == (1, config.num_patches, config.projection_dim)
