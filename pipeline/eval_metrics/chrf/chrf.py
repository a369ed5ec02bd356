"""chrF (character n-gram F-score, Popović 2015) through sacrebleu, as the Hub's `chrf` metric computes it."""
import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = "Corpus-level chrF of the predictions against one reference each (sacrebleu's CHRF, 0-100)."
_KWARGS = """
Args:
    predictions: list of str, the generated answers.
    references: list of str, one reference answer per prediction.
    word_order: int, 0 for chrF, 2 for chrF++ (default 0).
Returns:
    chrf: float in [0, 100].
"""
_CITATION = """@inproceedings{popovic-2015-chrf, title = "chr{F}: character n-gram {F}-score for automatic {MT}
evaluation", author = "Popovi{\\'c}, Maja", booktitle = "Proceedings of the Tenth Workshop on Statistical Machine
Translation", year = "2015"}"""


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, word_order=0):
        score = CHRF(word_order=word_order).corpus_score(list(predictions), [list(references)])
        return {"chrf": score.score}
