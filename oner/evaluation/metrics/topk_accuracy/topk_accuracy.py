"""Top-K accuracy of ranked class predictions, as an `evaluate` module loaded by path offline.

`evaluate.load("accuracy")` downloads its script from the Hub; this one ships with OneR and also
gives top-5, which zero-shot classification reports (ImageNet convention).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Top-K accuracy: the fraction of examples whose true class is among the K highest-scored classes.
Top-1 is plain accuracy.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[list[int]]`): per example, class ids ranked best first (at least max(k),
        or all classes when there are fewer).
    references (`list[int]`): the true class id of each example.
    k (`list[int]`, default `[1, 5]`): the cut-offs.
Returns:
    `{"top1": float, "top5": float, ...}` in [0, 1].
Examples:
    >>> acc = evaluate.load("oner/evaluation/metrics/topk_accuracy")
    >>> acc.compute(predictions=[[1, 0], [1, 0]], references=[1, 0], k=[1, 2])
    {'top1': 0.5, 'top2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    """Top-K accuracy from ranked class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        if len(references) == 0:
            raise ValueError("no examples: references is empty")
        out = {}
        for kk in k:
            hits = [ref in pred[: int(kk)] for pred, ref in zip(predictions, references)]
            out[f"top{int(kk)}"] = float(np.mean(hits))
        return out
