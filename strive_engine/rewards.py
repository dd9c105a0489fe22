"""Rewards (stage 6): accuracy by problem type as Video-R1 defines it, the format reward, T-GRPO's bonus.

    out = compute_rewards(batch.texts, answers, problem_types, cfg.reward)
    out.reward (M,) = accuracy_weight * out.accuracy + format_weight * out.format      # float32
    out = step_rewards(batch.texts, records, K, G, cfg.reward)                         # the same, (B, K, G)

Answer extraction: the text inside the *last* `<answer>…</answer>` of the completion (inner whitespace
stripped; if that text itself opens another `<answer>`, the part after it — nested tags). No closed answer
tag -> no answer -> accuracy 0. Nothing here raises on model output: unparseable answers score 0.

Accuracy per problem type (Video-R1's `accuracy_reward`, with the normalisations listed):
  multiple choice  option letter equality. "B", "B.", "(B)", "B)", "B: red", "B. red", "Option B" all read B;
                   a lone lower-case letter ("c", "(c)") reads C; "a red circle" is not a letter (lower-case
                   followed by text is a word). The gold answer is read the same way.
  numerical        numbers equal after rounding to 2 decimals. "1,000" = 1000 (comma thousands groups only),
                   "3.0" = 3 (Video-R1 instead rejects "3.0" against "3"), a trailing unit word or % is allowed
                   ("12 cm", "40%"); number words ("three") and anything else are not numbers -> 0.
  OCR              1 - WER (word-level Levenshtein distance / reference words), clipped to [0, 1]; case-sensitive
                   whitespace tokens, as Video-R1.
  free-form        mean of ROUGE-1, ROUGE-2, ROUGE-L F1 over lower-cased alphanumeric tokens (non-alphanumeric
                   characters act as spaces, as rouge_score's tokenizer; no stemmer). When either side has no
                   bigram, ROUGE-2 is 1 if the token lists are equal else 0 (so an exact one-word match scores
                   1; rouge_score would give 2/3).
  regression       1 - |pred - gold| / |gold|, clipped to [0, 1] (gold 0: 1 if pred is 0 else 0; Video-R1's
                   1e-9 smoothing gives 0 there).
Format: 1 if the stripped completion fully matches `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL).
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTER_RE = re.compile(r"^(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*)?"
                        r"[(\[]?([A-Za-z])[)\]]?(?:[.:：,)\s]|$)(.*)$", re.DOTALL | re.IGNORECASE)
_NUMBER_RE = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)\s*(?:[A-Za-z°%]+)?\.?$")
# Video-R1 counts an answer as "correct" for T-GRPO when its accuracy reward exceeds this.
CORRECT_THRESHOLD = 0.1


@dataclass
class RewardOutput:
    """Per completion: (M,) from compute_rewards, (B, K, G) from step_rewards."""

    reward: Tensor    # float32: accuracy_weight * accuracy + format_weight * format (+ the temporal bonus)
    accuracy: Tensor  # float32 in [0, 1]
    format: Tensor    # float32 in {0, 1}


# ------------------------------------------------------------------------------------------ parsing


def extract_answer(text: str) -> str | None:
    """Text inside the last `<answer>…</answer>`, stripped; None when there is no closed answer tag."""
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    ans = found[-1]
    if "<answer>" in ans:  # "<answer><answer>B</answer></answer>": the innermost opening wins
        ans = ans.rsplit("<answer>", 1)[1]
    return ans.strip()


def parse_option_letter(text: str) -> str | None:
    """"B", "(B)", "B.", "B. red", "Option B", "c" -> the upper-case letter; None if it is not a letter answer."""
    m = _LETTER_RE.match(text.strip())
    if not m:
        return None
    letter, rest = m.group(1), m.group(2)
    if letter.islower() and rest.strip():
        return None  # "a red circle": a word, not option (a)
    return letter.upper()


def parse_number(text: str) -> float | None:
    """"1,000" -> 1000.0, "3.0" -> 3.0, "12 cm" -> 12.0, "40%" -> 40.0; None for anything else ("1e3", "1_000",
    "1,2,3", "inf"). The engine's one number parser: `data.load_records` keeps a numerical or regression record
    only when this reads its gold answer, so an exact answer always scores."""
    m = _NUMBER_RE.match(text.strip())
    if not m:
        return None
    value = float(m.group(1).replace(",", ""))
    return value if math.isfinite(value) else None


def _levenshtein(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance / number of reference words (Video-R1: / max(1, m))."""
    ref, hyp = reference.split(), hypothesis.split()
    return _levenshtein(ref, hyp) / max(1, len(ref))


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^\w]|_", " ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_f1(reference: str, hypothesis: str) -> tuple[float, float, float]:
    """(ROUGE-1, ROUGE-2, ROUGE-L) F1 of hypothesis against reference."""
    ref, hyp = _rouge_tokens(reference), _rouge_tokens(hypothesis)
    if not ref or not hyp:
        return (0.0, 0.0, 0.0)
    scores = []
    for n in (1, 2):
        rg = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        hg = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        if not rg or not hg:
            scores.append(float(ref == hyp))
        else:
            scores.append(_f1(sum((rg & hg).values()), sum(hg.values()), sum(rg.values())))
    scores.append(_f1(_lcs(ref, hyp), len(hyp), len(ref)))
    return tuple(scores)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ rewards


def _accuracy(pred: str, gold: str, problem_type: str) -> float:
    if problem_type == "multiple choice":
        p, g = parse_option_letter(pred), parse_option_letter(gold)
        return float(p is not None and p == g)
    if problem_type == "numerical":
        p, g = parse_number(pred), parse_number(gold)
        return float(p is not None and g is not None and round(p, 2) == round(g, 2))
    if problem_type == "OCR":
        return min(1.0, max(0.0, 1.0 - word_error_rate(gold, pred)))
    if problem_type == "free-form":
        return min(1.0, max(0.0, sum(rouge_f1(gold, pred)) / 3))
    # regression
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return 0.0
    if g == 0:
        return float(p == 0)
    return 1.0 - min(1.0, abs(p - g) / abs(g))


def accuracy_reward(completion: str, answer: str, problem_type: str) -> float:
    """Accuracy in [0, 1] of one completion against the gold answer (which may itself carry answer tags)."""
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    gold = extract_answer(answer)
    gold = answer.strip() if gold is None else gold
    try:
        return _accuracy(pred, gold, problem_type)
    except (ValueError, OverflowError, ZeroDivisionError, RecursionError) as e:  # belt and braces: never raise
        log.warning("accuracy_reward: %s on %r (gold %r): scored 0", type(e).__name__, pred[:80], gold[:80])
        return 0.0


def format_reward(completion: str) -> float:
    """1.0 if the completion is `<think>…</think>` then `<answer>…</answer>` and nothing else, else 0.0."""
    return float(FORMAT_RE.fullmatch(completion.strip()) is not None)


def compute_rewards(texts: list[str], answers: list[str], problem_types: list[str], cfg: Any) -> RewardOutput:
    """`cfg: RewardConfig`. One reward per completion (M,); answers / problem_types are per completion too."""
    if not (len(texts) == len(answers) == len(problem_types)):
        raise ValueError(f"compute_rewards: {len(texts)} texts, {len(answers)} answers, "
                         f"{len(problem_types)} problem types; need one of each per completion")
    acc = torch.tensor([accuracy_reward(t, a, p) for t, a, p in zip(texts, answers, problem_types)],
                       dtype=torch.float32)
    fmt = torch.tensor([format_reward(t) for t in texts], dtype=torch.float32)
    return RewardOutput(reward=cfg.accuracy_weight * acc + cfg.format_weight * fmt, accuracy=acc, format=fmt)


def temporal_bonus(acc_ordered: Tensor, acc_shuffled: Tensor, alpha: float, mu: float = 0.8) -> Tensor:
    """Video-R1 T-GRPO bonus, to be added to the ordered answers' rewards: (B, n) float32.

    Per question b: p = mean accuracy of its n answers on temporally ordered frames (B, n), q = mean accuracy
    of its answers on shuffled frames (B, n'); when p >= mu * q (Video-R1: mu = 0.8), every ordered answer
    with accuracy > 0.1 ("correct") gets alpha; otherwise nothing. mu = 1 with p > q strictly differs only
    on ties. Rows of STRIVE are all K*G answers of a question.
    """
    if acc_ordered.dim() != 2 or acc_shuffled.dim() != 2 or acc_ordered.shape[0] != acc_shuffled.shape[0]:
        raise ValueError(f"temporal_bonus: need (B, n) and (B, n') accuracies, got {tuple(acc_ordered.shape)} "
                         f"and {tuple(acc_shuffled.shape)}")
    p = acc_ordered.float().mean(1, keepdim=True)                                # (B, 1)
    q = acc_shuffled.float().mean(1, keepdim=True)                               # (B, 1)
    applies = p >= mu * q                                                        # (B, 1)
    return (applies & (acc_ordered > CORRECT_THRESHOLD)).float() * alpha         # (B, n)


def step_rewards(texts: list[str], records: list[Any], K: int, G: int, cfg: Any,
                 shuffled_texts: list[str] | None = None, temporal_alpha: float = 0.0) -> RewardOutput:
    """A step's rewards, (B, K, G): completion texts[(b * K + k) * G + g] answers question records[b] on its
    view k (the rollout's row order). `cfg: RewardConfig`. T-GRPO: with `shuffled_texts`, the B * G answers to
    the questions' shuffled canonical views (rollout.shuffled_rollouts), `temporal_bonus(alpha=temporal_alpha)`
    is added to the ordered answers' rewards."""
    B = len(records)
    rows = [r for r in records for _ in range(K * G)]
    out = compute_rewards(texts, [r.answer for r in rows], [r.problem_type for r in rows], cfg)
    reward, accuracy, fmt = (x.view(B, K, G) for x in (out.reward, out.accuracy, out.format))
    if shuffled_texts is not None:
        rows = [r for r in records for _ in range(G)]
        acc_sh = compute_rewards(shuffled_texts, [r.answer for r in rows], [r.problem_type for r in rows],
                                 cfg).accuracy.view(B, G)
        bonus = temporal_bonus(accuracy.reshape(B, K * G), acc_sh, temporal_alpha, cfg.temporal_mu)  # (B, K*G)
        reward = reward + bonus.view(B, K, G)
    return RewardOutput(reward=reward, accuracy=accuracy, format=fmt)
