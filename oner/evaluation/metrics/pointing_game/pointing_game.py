"""The pointing game (Zhang et al., ECCV 2016) as an `evaluate` module loaded by path offline.

A localization map "points" at its maximum; the query counts as a hit when that point lies inside
the ground-truth box of the object the query names.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Pointing-game accuracy: the fraction of queries whose predicted point (the argmax of a
localization map) falls inside the object's box. Boxes are (x0, y0, x1, y1) in pixels with the
right and bottom edges exclusive, as PIL's getbbox; a point exactly on x0 or y0 is inside.
`tolerance` (pixels) grows each box on all sides, as in the original pointing game (15 px there;
0 by default here, because emoji boxes are tight and small).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[list[float]]`): per query, the point (x, y).
    references (`list[list[float]]`): per query, the box (x0, y0, x1, y1).
    tolerance (`float`, default 0): pixels added to each side of every box.
Returns:
    `{"pointing_accuracy": float}` in [0, 1].
Examples:
    >>> pg = evaluate.load("oner/evaluation/metrics/pointing_game")
    >>> pg.compute(predictions=[[5, 5], [20, 5]], references=[[0, 0, 10, 10], [0, 0, 10, 10]])
    {'pointing_accuracy': 0.5}
"""


def inside(points: np.ndarray, boxes: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """`(n, 2)` points, `(n, 4)` boxes -> `(n,)` booleans: point i inside box i (half-open box)."""
    x, y = points[:, 0], points[:, 1]
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    t = tolerance
    return (x >= x0 - t) & (x < x1 + t) & (y >= y0 - t) & (y < y1 + t)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PointingGame(evaluate.Metric):
    """Hit rate of predicted points inside reference boxes."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="""\
@inproceedings{zhang2016top,
  title={Top-down Neural Attention by Excitation Backprop},
  author={Zhang, Jianming and Lin, Zhe and Brandt, Jonathan and Shen, Xiaohui and Sclaroff, Stan},
  booktitle={ECCV},
  year={2016}
}
""",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64"), length=2),
                    "references": datasets.Sequence(datasets.Value("float64"), length=4),
                }
            ),
        )

    def _compute(self, predictions, references, tolerance=0.0):
        if len(references) == 0:
            raise ValueError("no queries: references is empty")
        hits = inside(np.asarray(predictions, float), np.asarray(references, float), float(tolerance))
        return {"pointing_accuracy": float(hits.mean())}
