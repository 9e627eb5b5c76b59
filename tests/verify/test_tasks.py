"""Answer extraction and scoring of task sets (boxed math answers, multiple-choice letters)."""

from __future__ import annotations

import pytest

from builder.errors import UserError
from builder.quantize.calib import calib_dir
from builder.verify.tasks import Task, accuracy, extract_answer, last_boxed, load_tasks, same_answer


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The sum is \\boxed{42}.", "42"),
        ("<think>maybe \\boxed{41}</think>\n\nSo \\boxed{42}", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{4}}", "\\frac{1}{4}"),
        ("no box here: 42", None),
    ],
)
def test_math_answers_are_the_last_boxed_expression(reply, expected):
    assert extract_answer(reply, "math") == expected


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: d", "D"),
        ("\\boxed{A}", "A"),
        ("<think>A seems wrong, B too</think>\n\nMars is B) Mars", "B"),
        ("I think it is A, a primary colour.", "A"),
        ("none of them", None),
    ],
)
def test_choice_answers_are_letters(reply, letter):
    assert extract_answer(reply, "choice") == letter


def test_numeric_and_textual_comparison():
    assert same_answer("84", "84", "math") and same_answer("\\$84.00", "84", "math")
    assert same_answer("\\frac{1}{4}", "0.25", "math") and same_answer("1,000", "1000", "math")
    assert not same_answer("85", "84", "math") and same_answer("x + 1", "x+1", "math")
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c" and last_boxed("\\boxed{open") is None


def test_bundled_sample_scores_as_expected():
    tasks = load_tasks(calib_dir() / "tasks-sample.jsonl")
    assert [t.type for t in tasks] == ["math"] * 3 + ["choice"] * 3
    assert "\\boxed{}" in tasks[0].user_turn() and "B) Mars" in tasks[3].user_turn()
    replies = [
        "\\boxed{42}",
        "It is 84.",
        "\\boxed{1/4}",
        "B",
        "The answer is B",
        "<think>x</think>A",
    ]
    assert accuracy(tasks, replies) == pytest.approx(4 / 6)  # no box; '1/4' is not a number


def test_bad_task_lines_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"type": "essay", "question": "q", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"t.jsonl:1: 'type' must be one of math, choice"):
        load_tasks(path)
    assert Task("q", "B", "choice").correct("B")
