"""Segmentation metrics: pure functions on arrays, then a thin layer over folders of label maps.

- `metrics`: the pure functions on arrays (`confusion`, `dice`, `iou`, `precision`, `recall`,
  `hd95`, `image_diagonal`), `evaluate_case` and `summarize`, with the empty rule below;
- `folders`: `evaluate_folders` over folders of label maps, `write_results` (JSON and CSV),
  and the table and empty-rule note that the CLI and the HTML report show.

Empty rule of the pure metrics (each states it): a ratio whose denominator is 0 is NaN, so Dice
and IoU are NaN when reference and prediction are both empty for a label, and 0 when exactly one
is; precision is NaN when nothing is predicted, recall NaN when the reference is empty. HD95 is
NaN when both are empty and inf when exactly one is.

A label is *missed* in a case when only the reference holds it, *spurious* when only the
prediction does. `evaluate_case` scores these by the ``empty`` policy (`EMPTY_POLICIES`):

- ``"worst"`` (default, as Metrics Reloaded (Maier-Hein et al., Nat. Methods 2024) asks, so
  that failures cannot vanish from a mean): their HD95 is the image diagonal in mm
  (`image_diagonal`), and a missed label's precision (0/0) is 0. A spurious label's recall stays
  NaN: an empty reference has nothing to recall, and Metrics Reloaded's reference code also
  leaves it undefined; Dice, IoU and precision 0 and the worst HD95 already score the error.
- ``"exclude"``: the pure inf and NaN are kept, so means skip those cases (the earlier behaviour).

Either way the summary counts the missed and spurious cases per label. Means skip NaN and inf;
JSON has no NaN/inf tokens, so `write_results` writes both as ``null`` (and the CSV an empty
cell). Which case a value stood for can be read from that row's ``n_ref`` and ``n_pred``.

`evaluate_folders` returns, and `write_results` writes, this layout (background is listed under
"labels" so the block reads back with `medseg.datasets.read_label_names`; metrics cover only
foreground labels, keyed by name; the tumour was missed on a 512 x 512 x 100 grid of
0.8 x 0.8 x 2.5 mm, whose diagonal is 630.9 mm)::

    {
      "labels": {"0": "background", "1": "liver", "2": "tumour"},
      "empty": "worst",
      "cases": {
        "case_001": {
          "liver": {"dice": 0.95, "iou": 0.905, "precision": 0.96, "recall": 0.94,
                    "hd95": 2.1, "tp": 9400, "fp": 392, "fn": 600,
                    "n_ref": 10000, "n_pred": 9792},
          "tumour": {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                     "hd95": 630.9, "tp": 0, "fp": 0, "fn": 120, "n_ref": 120, "n_pred": 0}
        }
      },
      "mean": {
        "labels": {
          "liver": {"dice": 0.95, "iou": 0.905, "precision": 0.96, "recall": 0.94,
                    "hd95": 2.1, "n_cases": 1, "n_missed": 0, "n_spurious": 0},
          "tumour": {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                     "hd95": 630.9, "n_cases": 1, "n_missed": 1, "n_spurious": 0}
        },
        "foreground_mean": {"dice": 0.475, "iou": 0.4525}
      }
    }

``empty`` is the policy the values were scored with. ``n_cases`` counts the cases where the label
is in the reference or the prediction (Dice is defined); ``n_missed`` and ``n_spurious`` count
the missed and spurious cases among them. The CSV next to the JSON has the columns in
`CSV_COLUMNS`: one row per (case, label), then one row per label with case ``mean`` (count
columns empty).
"""

from __future__ import annotations

from medseg.evaluation.folders import (
    CSV_COLUMNS,
    EvaluationError,
    empty_rule_note,
    evaluate_folders,
    format_table,
    write_results,
)
from medseg.evaluation.metrics import (
    COUNT_METRICS,
    EMPTY_POLICIES,
    FLOAT_METRICS,
    confusion,
    dice,
    evaluate_case,
    hd95,
    image_diagonal,
    iou,
    precision,
    recall,
    summarize,
)

__all__ = [
    "COUNT_METRICS",
    "CSV_COLUMNS",
    "EMPTY_POLICIES",
    "FLOAT_METRICS",
    "EvaluationError",
    "confusion",
    "dice",
    "empty_rule_note",
    "evaluate_case",
    "evaluate_folders",
    "format_table",
    "hd95",
    "image_diagonal",
    "iou",
    "precision",
    "recall",
    "summarize",
    "write_results",
]
