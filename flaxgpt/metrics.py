"""Scores of generated text against references, from well-kept libraries (sacrebleu,
rouge-score), so figures compare with what other frameworks report."""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match (after trimming), corpus BLEU and mean ROUGE-1 / ROUGE-L F1.

    BLEU uses sacrebleu's effective order: chat answers are often shorter than four
    words, and plain 4-gram BLEU would score a perfect one-word answer 0.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)
    bleu = BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    mean = lambda key: sum(s[key].fmeasure for s in scores) / len(scores)
    return {"exact_match": exact, "bleu": bleu, "rouge1": mean("rouge1"), "rougeL": mean("rougeL")}
