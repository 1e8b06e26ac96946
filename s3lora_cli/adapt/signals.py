"""The Trigger's signals for one generated answer against its gold answer: behavioural (logit margin), lexical
(sentence BLEU, ROUGE-L F, exact match) and semantic (cosine of embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Signals:
    """margin: mean over the answer's tokens of top-1 minus top-2 logit (>= 0); bleu: sacrebleu's sentence BLEU
    / 100; rouge_l: rouge-score's ROUGE-L F-measure; similarity: cosine of the two answers' embeddings. Each of
    bleu, rouge_l is in [0, 1], similarity in [-1, 1]; exact_match: 1.0 when the answer equals the gold one after
    ``s3lora eval``'s normalisation, else 0.0."""

    margin: float
    bleu: float
    rouge_l: float
    similarity: float
    exact_match: float = 0.0


def logit_margins(logits, answer_mask):
    """Mean top-1 minus top-2 logit over each sample's answer tokens.

    logits: [steps, batch, vocab] (the raw logits of each generation step); answer_mask: [batch, steps], True at
    the steps that produced the sample's answer (up to and including its end-of-sequence token). Returns a list
    of ``batch`` floats; a sample with no answer step gets 0."""
    import torch

    top2 = torch.topk(logits.float(), 2, dim=-1).values  # [steps, batch, 2]
    gaps = (top2[..., 0] - top2[..., 1]).transpose(0, 1)  # [batch, steps]
    mask = answer_mask.to(gaps.dtype)
    counts = mask.sum(dim=1)
    means = (gaps * mask).sum(dim=1) / counts.clamp(min=1)
    return [float(v) for v in means]


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (13a tokenisation, exponential smoothing), scaled to [0, 1]."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score) / 100.0


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(hypothesis: str, reference: str) -> float:
    """rouge-score's ROUGE-L F-measure of ``hypothesis`` against ``reference``."""
    return float(_rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 when either is zero), computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms > 0 else 0.0
