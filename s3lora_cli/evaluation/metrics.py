"""The metrics of ``s3lora eval``, as pure functions: answer matching and refusal detection on strings, and the
per-token statistics of teacher-forced answers (negative log-likelihood, KL divergence from the full adapter,
top-1 agreement) on logits."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-cased (Unicode casefold, NFKC), ASCII punctuation removed, runs of whitespace made one space, stripped:
    "The capital is Paris." -> "the capital is paris"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def exact_match(answer: str, gold: str) -> bool:
    """The normalised answer equals the normalised gold answer."""
    return normalize_answer(answer) == normalize_answer(gold)


def contains_match(answer: str, gold: str) -> bool:
    """The normalised gold answer occurs in the normalised answer, on word boundaries ("paris" in "it is paris",
    not "10" in "100")."""
    return f" {normalize_answer(gold)} " in f" {normalize_answer(answer)} "


def _fold_refusal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").casefold()


def is_refusal(answer: str, markers: Sequence[str]) -> bool:
    """The answer contains one of ``markers`` (case-insensitive; typographic apostrophes read as "'")."""
    folded = _fold_refusal(answer)
    return any(_fold_refusal(marker) in folded for marker in markers)


@dataclass(frozen=True)
class TokenSums:
    """Sums over answer tokens, to be divided by ``tokens`` once every batch is in: ``nll`` = sum of
    -log p(y_t | context, y_<t); ``kl`` = sum of KL(p_ref || p) of the next-token distributions at those
    positions; ``agree`` = how many positions have the same most likely next token as the reference."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def __add__(self, other: TokenSums) -> TokenSums:
        return TokenSums(self.tokens + other.tokens, self.nll + other.nll, self.kl + other.kl, self.agree + other.agree)


def token_sums(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> TokenSums:
    """The statistics of one batch of teacher-forced answers.

    logits, reference: [batch, T, vocab], the variant's and the full adapter's next-token logits at the positions
    that predict the answer tokens; targets: [batch, T] the answer token ids; mask: [batch, T] True at real
    answer tokens (answers shorter than T are padded). KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)),
    in float64 from the logits' log-softmax. The most likely token is the first index of the maximum."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    logq = torch.log_softmax(reference.to(torch.float64), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    agree = logits.argmax(-1) == reference.argmax(-1)
    return TokenSums(int(mask.sum()), float(nll[mask].sum()), float(kl[mask].sum()), int(agree[mask].sum()))


@dataclass(frozen=True)
class Scores:
    """A variant's metrics. exact_match, contains: shares of the tasks whose greedy answer matches; nll: mean
    negative log-likelihood per gold answer token (nats); kl: mean KL(p_adapter || p_variant) per answer token
    (nats); agreement: share of answer tokens whose most likely next token is the full adapter's; refusal_rate:
    share of the refusal prompts answered with a refusal (None without refusal prompts)."""

    exact_match: float
    contains: float
    nll: float
    kl: float
    agreement: float
    refusal_rate: float | None


def scores(
    answers: Sequence[str],
    golds: Sequence[str],
    sums: TokenSums,
    refusal_answers: Sequence[str] | None,
    markers: Sequence[str],
) -> Scores:
    """Aggregate a variant's greedy answers (against ``golds``), its token sums and its refusal answers."""
    n = len(golds)
    tokens = max(sums.tokens, 1)
    refusal_rate = None
    if refusal_answers is not None:
        refusal_rate = sum(is_refusal(a, markers) for a in refusal_answers) / max(len(refusal_answers), 1)
    return Scores(
        exact_match=sum(map(exact_match, answers, golds)) / n,
        contains=sum(map(contains_match, answers, golds)) / n,
        nll=sums.nll / tokens,
        kl=sums.kl / tokens,
        agreement=sums.agree / tokens,
        refusal_rate=refusal_rate,
    )
