"""Recall@K for retrieval with one or several relevant items per query, as an `evaluate` module.

`evaluate` has no image-text retrieval metric, and `evaluate.load("<hub name>")` needs the network,
so OneR ships this one and loads it by path: `evaluate.load("<this folder>")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Recall@K of a ranked retrieval: the fraction of queries for which AT LEAST ONE relevant item is
among the top K retrieved ones. This is the COCO/Flickr30k convention for image->text retrieval,
where an image has several captions and a hit on any of them counts.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[list[int]]`): per query, the ids of the retrieved items, best first
        (at least max(k) of them, or all the gallery when it is smaller).
    references (`list[list[int]]`): per query, the ids of the relevant items (one or more).
    k (`list[int]`, default `[1, 5, 10]`): the cut-offs.
Returns:
    `{"R@1": float, "R@5": float, ...}` in [0, 1].
Examples:
    >>> recall = evaluate.load("oner/evaluation/metrics/retrieval_recall")
    >>> recall.compute(predictions=[[2, 0, 1], [0, 1, 2]], references=[[0], [2, 1]], k=[1, 2])
    {'R@1': 0.0, 'R@2': 1.0}
"""

_CITATION = """\
@inproceedings{jang2023oner,
  title={Unifying Vision-Language Representation Space with Single-tower Transformer},
  author={Jang, Jiho and Kong, Chaerin and Jeon, Donghyeon and Kim, Seonhoon and Kwak, Nojun},
  booktitle={AAAI},
  year={2023}
}
"""


def recall_at_k(ranked: list[list[int]], relevant: list[list[int]], k: int) -> float:
    """Mean over queries of [any relevant id in the first `k` ranked ids]."""
    if not ranked:
        raise ValueError("no queries: predictions is empty")
    hits = [bool(set(r[:k]) & set(rel)) for r, rel in zip(ranked, relevant)]
    return float(np.mean(hits))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@K with several relevant items per query allowed."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)):
        for i, rel in enumerate(references):
            if len(rel) == 0:
                raise ValueError(f"query {i} has no relevant item")
        return {f"R@{int(kk)}": recall_at_k(predictions, references, int(kk)) for kk in k}
