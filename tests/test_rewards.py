"""Rewards on a table of real-looking model outputs; expected values worked out by hand."""
import random

import pytest
import torch

from strive_engine.config import RewardConfig
from strive_engine.rewards import (PROBLEM_TYPES, accuracy_reward, compute_rewards, extract_answer, format_reward,
                                   parse_number, parse_option_letter, rouge_f1, temporal_bonus, word_error_rate)

MC, NUM, OCR, FREE, REG = PROBLEM_TYPES
LONG_THINK = "<think>" + "let me think. wait, the red one flashes. " * 3000 + "</think><answer>A</answer>"

# (completion, gold answer, problem type, expected accuracy, expected format)
TABLE = [
    # ---- multiple choice
    ("<think>The red circle shows up only once, near the end.</think><answer>B</answer>", "B", MC, 1.0, 1.0),
    ("<think>hmm, let me think</think>\n<answer>B</answer>", "B", MC, 1.0, 1.0),
    ("<think>the square is first</think> <answer>C</answer>", "B", MC, 0.0, 1.0),
    ("<answer>B</answer>", "B", MC, 1.0, 0.0),                                   # missing think
    ("<think>red appears briefly</think>", "B", MC, 0.0, 0.0),                   # missing answer
    ("The answer is B", "B", MC, 0.0, 0.0),                                      # no tags at all
    ("<think>x</think><answer>B. red</answer>", "B", MC, 1.0, 1.0),
    ("<think>x</think><answer>(c)</answer>", "C", MC, 1.0, 1.0),
    ("<think>x</think><answer>(B)</answer>", "B. red", MC, 1.0, 1.0),            # gold with option text
    ("<think>x</think><answer>b</answer>", "B", MC, 1.0, 1.0),
    ("<think>x</think><answer>a red circle</answer>", "A", MC, 0.0, 1.0),        # a word, not option (a)
    ("<think>x</think><answer>Option D</answer>", "D", MC, 1.0, 1.0),
    ("<think>x</think><answer>The answer is D.</answer>", "<answer>D</answer>", MC, 1.0, 1.0),
    ("<think><think>nested</think></think><answer><answer>A</answer></answer>", "A", MC, 1.0, 1.0),
    ("<think>first A, no wait</think><answer>A</answer><answer>C</answer>", "C", MC, 1.0, 1.0),  # last wins
    ("<think>t</think><answer>C</answer> Actually <answer>A</answer>", "C", MC, 0.0, 1.0),
    ("", "A", MC, 0.0, 0.0),
    ("\ufffd\x00\uffff日本語🙂 <answer>\u200bB\u200b</answer>", "B", MC, 0.0, 0.0),  # zero-width junk
    (LONG_THINK, "A", MC, 1.0, 1.0),
    ("blah " * 20000, "A", MC, 0.0, 0.0),
    ("  <think>t</think><answer>A</answer>\n", "A", MC, 1.0, 1.0),               # outer whitespace ignored
    ("<think>t</think>extra<answer>A</answer>", "A", MC, 1.0, 0.0),              # text between the blocks
    ("<think>t</think><answer>A</answer> trailing", "A", MC, 1.0, 0.0),
    ("<THINK>t</THINK><ANSWER>A</ANSWER>", "A", MC, 0.0, 0.0),                   # tags are case-sensitive
    ("<think>t</think><answer>A", "A", MC, 0.0, 0.0),                            # unclosed answer
    # ---- numerical
    ("<think>it flashes three times</think><answer>3</answer>", "3", NUM, 1.0, 1.0),
    ("<answer>3.0</answer>", "3", NUM, 1.0, 0.0),
    ("<think>t</think><answer>1,000</answer>", "1000", NUM, 1.0, 1.0),
    ("<think>t</think><answer>12 cm</answer>", "12", NUM, 1.0, 1.0),
    ("<think>t</think><answer>three</answer>", "3", NUM, 0.0, 1.0),              # number words are not numbers
    ("<think>t</think><answer>3.14159</answer>", "3.14", NUM, 1.0, 1.0),
    ("<think>t</think><answer>3.146</answer>", "3.14", NUM, 0.0, 1.0),           # rounds to 3.15
    ("<think>t</think><answer>about 4</answer>", "4", NUM, 0.0, 1.0),
    ("<think>t</think><answer>-2.5</answer>", "-2.5", NUM, 1.0, 1.0),
    ("<think>t</think><answer>1,00</answer>", "100", NUM, 0.0, 1.0),             # not a thousands group
    ("<think>t</think><answer>40%</answer>", "40", NUM, 1.0, 1.0),
    ("<think>t</think><answer>7.</answer>", "7", NUM, 1.0, 1.0),
    # ---- OCR: 1 - WER, case-sensitive words
    ("<think>t</think><answer>STOP AHEAD</answer>", "STOP AHEAD", OCR, 1.0, 1.0),
    ("<think>t</think><answer>STOP</answer>", "STOP AHEAD", OCR, 0.5, 1.0),
    ("<think>t</think><answer>GO SLOW NOW PLEASE</answer>", "STOP", OCR, 0.0, 1.0),   # WER 4 -> clipped
    ("<think>t</think><answer>stop ahead</answer>", "STOP AHEAD", OCR, 0.0, 1.0),
    ("<think>t</think><answer>STOP AHEAD NOW</answer>", "STOP AHEAD", OCR, 0.5, 1.0),
    # ---- free-form: mean ROUGE-1/2/L F1
    ("<think>t</think><answer>The man opens the door.</answer>", "the man opens the door", FREE, 1.0, 1.0),
    # R1 = 3/5 overlap both ways = 0.6, R2 = 1/4 = 0.25, RL = LCS 3 -> 0.6; mean 1.45/3
    ("<think>t</think><answer>a man opens a door</answer>", "the man opens the door", FREE, 1.45 / 3, 1.0),
    ("<think>t</think><answer>red</answer>", "red", FREE, 1.0, 1.0),
    ("<think>t</think><answer>blue</answer>", "red", FREE, 0.0, 1.0),
    # ---- regression: 1 - relative error, clipped
    ("<think>t</think><answer>9</answer>", "10", REG, 0.9, 1.0),
    ("<think>t</think><answer>30</answer>", "10", REG, 0.0, 1.0),
    ("<think>t</think><answer>0</answer>", "0", REG, 1.0, 1.0),
    ("<think>t</think><answer>n/a</answer>", "10", REG, 0.0, 1.0),
    ("<think>t</think><answer>10.5 m</answer>", "10", REG, 0.95, 1.0),
]


@pytest.mark.parametrize("completion,gold,ptype,acc,fmt", TABLE, ids=[f"row{i}" for i in range(len(TABLE))])
def test_reward_table(completion, gold, ptype, acc, fmt):
    assert accuracy_reward(completion, gold, ptype) == pytest.approx(acc, abs=1e-9)
    assert format_reward(completion) == fmt


def test_table_is_big_enough():
    assert len(TABLE) >= 30


def test_compute_rewards_weights_and_dtype():
    rows = TABLE[:8]
    cfg = RewardConfig(accuracy_weight=1.0, format_weight=0.5)
    out = compute_rewards([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], cfg)
    acc = torch.tensor([r[3] for r in rows])
    fmt = torch.tensor([r[4] for r in rows])
    assert out.reward.dtype == out.accuracy.dtype == out.format.dtype == torch.float32
    torch.testing.assert_close(out.accuracy, acc)
    torch.testing.assert_close(out.format, fmt)
    torch.testing.assert_close(out.reward, acc + 0.5 * fmt)
    out2 = compute_rewards([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                           RewardConfig(accuracy_weight=2.0, format_weight=0.0))
    torch.testing.assert_close(out2.reward, 2 * acc)


def test_bad_calls_raise_clear_errors():
    with pytest.raises(ValueError, match="3 texts, 2 answers"):
        compute_rewards(["a", "b", "c"], ["A", "B"], [MC] * 3, RewardConfig())
    with pytest.raises(ValueError, match="'essay' is not one of"):
        accuracy_reward("<answer>A</answer>", "A", "essay")


def test_model_output_never_raises():
    """Random soup of tags, digits, letters, unicode: always a reward in [0, 1], never an exception."""
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", "A", "b", "(", ")", ".", ",", "1", "0", "-", " ",
             "\n", "%", "cm", "日", "\x00", "\ufffd", "e", "inf", "nan", "1,000", "9" * 400]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        gold = rng.choice(["A", "3", "1,000", "STOP AHEAD", "the man", "0", "10"])
        for ptype in PROBLEM_TYPES:
            r = accuracy_reward(text, gold, ptype)
            assert 0.0 <= r <= 1.0, (text, gold, ptype)
        assert format_reward(text) in (0.0, 1.0)


def test_parsers():
    assert extract_answer("<answer> x </answer><answer> y\n</answer>") == "y"
    assert extract_answer("no tags") is None
    assert [parse_option_letter(s) for s in ["B", "B.", "(B)", "B)", "B: red", "[c]", "answer: d", "apple", "a cat"]] \
        == ["B", "B", "B", "B", "B", "C", "D", None, None]
    assert [parse_number(s) for s in ["1,000", "3.0", "12 cm", ".5", "-7", "1,0000", "3 4", "", "inf"]] \
        == [1000.0, 3.0, 12.0, 0.5, -7.0, None, None, None, None]
    assert parse_number("9" * 400) is None  # overflows to inf: not a usable number
    assert word_error_rate("a b c", "a x c") == pytest.approx(1 / 3)
    assert word_error_rate("", "") == 0.0
    r1, r2, rl = rouge_f1("the cat sat on the mat", "the cat on the mat")
    # ref 6 tokens, hyp 5: unigram overlap 5 -> P 1, R 5/6; bigrams: ref 5, hyp 4, overlap 3 (the cat, on the, the mat)
    assert r1 == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert r2 == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert rl == pytest.approx(r1)  # LCS = the cat on the mat = 5


def test_temporal_bonus_hand_worked():
    acc_o = torch.tensor([[1.0, 0.0, 1.0, 0.0],     # p = 0.5
                          [0.0, 0.0, 0.0, 0.0],     # p = 0: applies (0 >= 0) but nobody is correct
                          [1.0, 1.0, 0.5, 0.05]])   # p = 0.6375
    acc_s = torch.tensor([[1.0, 1.0],               # q = 1: 0.5 < 0.8
                          [0.0, 0.0],
                          [1.0, 0.5]])              # q = 0.75: 0.6375 >= 0.6 -> bonus to acc > 0.1
    b = temporal_bonus(acc_o, acc_s, alpha=0.3)
    torch.testing.assert_close(b, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.0]]))
    assert b.dtype == torch.float32
    # mu = 1: equal accuracy still gets the bonus (>=), lower does not
    b1 = temporal_bonus(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]]), alpha=0.5, mu=1.0)
    torch.testing.assert_close(b1, torch.tensor([[0.5, 0.0]]))
    b2 = temporal_bonus(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), alpha=0.5, mu=1.0)
    torch.testing.assert_close(b2, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="need \\(B, n\\)"):
        temporal_bonus(torch.ones(4), torch.ones(2, 2), 0.3)


def test_step_rewards_layout_and_the_temporal_bonus():
    """(B, K, G) from the rollout's row order (question, view, answer) against each question's gold answer; with
    the shuffled canonical views' answers (T-GRPO) the bonus goes to the correct ordered answers of a question
    whose ordered accuracy is at least mu x its shuffled accuracy. Worked by hand: B=2, K=2, G=2."""
    from types import SimpleNamespace

    from strive_engine.rewards import step_rewards

    q = [SimpleNamespace(answer="B", problem_type=MC), SimpleNamespace(answer="3", problem_type=NUM)]
    a = lambda x: f"<think>t</think><answer>{x}</answer>"  # noqa: E731
    texts = [a("B"), a("C"), "<answer>B</answer>", a("B"),   # question 0: views 0, 1 x answers 0, 1
             a("3"), a("4"), a("4"), a("4")]                  # question 1
    cfg = RewardConfig(accuracy_weight=1.0, format_weight=0.5, temporal_mu=0.8)
    out = step_rewards(texts, q, K=2, G=2, cfg=cfg)
    assert out.reward.shape == out.accuracy.shape == out.format.shape == (2, 2, 2)
    assert out.accuracy.tolist() == [[[1, 0], [1, 1]], [[1, 0], [0, 0]]]
    assert out.format.tolist() == [[[1, 1], [0, 1]], [[1, 1], [1, 1]]]
    torch.testing.assert_close(out.reward, out.accuracy + 0.5 * out.format)
    # shuffled answers, B x G: question 0 gets 0/2 right (0.75 >= 0.8 * 0: bonus), question 1 gets 2/2 (0.25 < 0.8)
    shuffled = [a("A"), a("D"), a("3"), a("3")]
    bonus = step_rewards(texts, q, K=2, G=2, cfg=cfg, shuffled_texts=shuffled, temporal_alpha=0.3)
    torch.testing.assert_close(bonus.reward - out.reward, 0.3 * torch.tensor([[[1.0, 0], [1, 1]], [[0, 0], [0, 0]]]))
    assert torch.equal(bonus.accuracy, out.accuracy) and torch.equal(bonus.format, out.format)
