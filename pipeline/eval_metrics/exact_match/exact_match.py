"""Exact match: the share of predictions equal to their reference (surrounding whitespace ignored)."""
import datasets
import evaluate

_DESCRIPTION = "Share of predictions that equal their reference after stripping surrounding whitespace."
_KWARGS = """
Args:
    predictions: list of str, the generated answers.
    references: list of str, one reference answer per prediction.
    ignore_case: bool, compare lower-cased strings (default False).
Returns:
    exact_match: float in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False):
        def norm(text):
            return text.strip().lower() if ignore_case else text.strip()

        hits = [norm(p) == norm(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
