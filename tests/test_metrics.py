"""The shipped metrics load offline by path and match hand-computed values."""

import math

import pytest

from oner.evaluation.context import chance_recall
from oner.evaluation.metrics import METRIC_NAMES, load_metric, metric_path


# one hand-computed case a metric: of two queries, the first right and the second wrong at the first rank
HAND_CASES = {
    "retrieval_recall": (dict(predictions=[[1, 0, 2], [0, 2, 1]], references=[[1], [2]], k=[1, 2]),
                         {"R@1": 0.5, "R@2": 1.0}),
    "topk_accuracy": (dict(predictions=[[1, 0, 2], [0, 2, 1]], references=[1, 1], k=[1, 2, 3]),
                      {"top1": 0.5, "top2": 0.5, "top3": 1.0}),
    "pointing_game": (dict(predictions=[[5, 5], [12, 5]], references=[[0, 0, 10, 20], [0, 0, 10, 20]]),
                      {"pointing_accuracy": 0.5}),
}


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_metric_loads_offline_by_path_and_scores_a_hand_case(name):
    # conftest sets HF_HUB_OFFLINE=1: a Hub download would raise here.
    assert metric_path(name).joinpath(f"{name}.py").is_file()
    kwargs, expected = HAND_CASES[name]
    assert load_metric(name).compute(**kwargs) == expected
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("accuracy")


def test_recall_at_k_hand_computed():
    # 3 image->text queries over 6 captions; image 0 owns captions {0, 1}, image 1 {2, 3}, image 2 {4, 5}.
    ranked = [
        [3, 1, 0, 2, 4, 5],  # image 0: first relevant (1) at rank 2
        [2, 0, 1, 3, 4, 5],  # image 1: relevant (2) at rank 1
        [0, 1, 2, 3, 5, 4],  # image 2: first relevant (5) at rank 5
    ]
    relevant = [[0, 1], [2, 3], [4, 5]]
    scores = load_metric("retrieval_recall").compute(predictions=ranked, references=relevant, k=[1, 2, 4, 5])
    assert scores == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@4": pytest.approx(2 / 3),
                      "R@5": 1.0}


def test_recall_rejects_a_query_without_relevant_item():
    with pytest.raises(ValueError, match="no relevant"):
        load_metric("retrieval_recall").compute(predictions=[[0, 1]], references=[[]], k=[1])


def test_topk_accuracy_hand_computed():
    ranked = [[2, 0, 1], [0, 1, 2], [1, 2, 0], [2, 1, 0]]
    labels = [2, 1, 0, 0]
    assert load_metric("topk_accuracy").compute(predictions=ranked, references=labels, k=[1, 2, 3]) == {
        "top1": 0.25, "top2": 0.5, "top3": 1.0}


def test_pointing_game_edges_and_tolerance():
    box = [10, 10, 20, 20]  # right/bottom edges exclusive
    points = [[10, 10], [19.5, 19.5], [20, 15], [9, 15]]
    pg = load_metric("pointing_game")
    assert pg.compute(predictions=points, references=[box] * 4) == {"pointing_accuracy": 0.5}
    assert pg.compute(predictions=points, references=[box] * 4, tolerance=1.5) == {"pointing_accuracy": 1.0}


def test_chance_recall_matches_the_hypergeometric_formula():
    # 10 captions, 2 relevant, top 3: 1 - C(8,3)/C(10,3) = 1 - 56/120
    assert chance_recall(10, [2], 3) == pytest.approx(1 - 56 / 120)
    assert chance_recall(100, [1, 1], 5) == pytest.approx(0.05)
    assert chance_recall(4, [1], 10) == 1.0  # k larger than the gallery
    assert math.isclose(chance_recall(5, [5], 1), 1.0)
