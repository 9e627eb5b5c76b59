"""`reference --tasks` answers in both of the card's modes and `verify` replays them: reasoning
off greedy, reasoning on sampled with the golden's seeds (synthetic model, same weights)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.quantize.calib import calib_dir
from builder.verify.golden import Golden, task_runs

TASKS = calib_dir() / "tasks-sample.jsonl"


@pytest.fixture(scope="module")
def task_golden(tmp_path_factory, mixed_ckpt_fp32):
    tmp = tmp_path_factory.mktemp("tasks")
    prompts = tmp / "p.jsonl"
    prompts.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    out = tmp / "golden"
    args = ["reference", str(mixed_ckpt_fp32), str(out), "--prompts", str(prompts)]
    args += ["--continuation", "2", "--probe-len", "4", "--dtype", "float32", "--tasks", str(TASKS)]
    args += ["--task-max-tokens", "3", "--task-reasoning-max-tokens", "5"]
    args += ["--task-samples", "2", "--task-seed", "7"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "tasks (6): reasoning off" in result.output and "reasoning on" in result.output
    return out


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory, mixed_ckpt_fp32):
    from builder.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("art") / "trtllm"
    convert_checkpoint(mixed_ckpt_fp32, out, tp=1)
    return out


def test_the_golden_records_both_modes_with_their_seeds(task_golden):
    golden = Golden.load(task_golden)
    modes = golden.task_modes()
    assert set(modes) == {"reasoning_off", "reasoning_on"}
    off, on = modes["reasoning_off"], modes["reasoning_on"]
    assert off["samples"] == 1 and off["seeds"] is None and off["sampling"]["temperature"] == 0
    assert on["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 5}
    assert on["samples"] == 2 and on["seeds"] == list(range(7, 19))
    assert len(on["replies"]) == 6 and all(len(r) == 2 for r in on["replies"])
    assert 0.0 <= on["accuracy"] <= 1.0 and 0.0 <= off["accuracy"] <= 1.0
    # two seeds on one prompt: the draws differ somewhere (a near-uniform random model)
    assert any(a != b for a, b in on["replies"])


def test_verify_replays_both_modes_on_the_same_weights(task_golden, same_weights, tmp_path):
    report = tmp_path / "report"
    args = ["verify", str(same_weights), "--golden", str(task_golden), "--report", str(report)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    metrics = record["metrics"]
    for name in ("task_accuracy", "task_accuracy_reasoning_on"):
        assert name in metrics and f"golden_{name}" in metrics
    rows = record["details"]["tasks"]
    assert [r["mode"] for r in rows] == ["reasoning_off"] * 6 + ["reasoning_on"] * 12
    assert [r["seed"] for r in rows[6:]] == list(range(7, 19))
    # Same fp32 weights, the same token picker and the same seeds: every reply, sampled ones
    # included, is the golden's (common random numbers), so the accuracies are the golden's.
    assert all(r["same_reply"] for r in rows), [r for r in rows if not r["same_reply"]]
    assert any(r["reply"] for r in rows[6:])  # sampled text, not empty replies compared
    for name in ("task_accuracy", "task_accuracy_reasoning_on"):
        assert metrics[name]["value"] == metrics[f"golden_{name}"]["value"]


def test_goldens_without_reasoning_on_still_verify():
    """Goldens written before reasoning-on scoring: no task_samples, reasoning off at the top."""
    runs = task_runs({"task_max_tokens": 4}, 3)
    assert list(runs) == ["reasoning_off"] and all(s.is_greedy for s in runs["reasoning_off"])
    old = Golden(None, {"tasks": {"accuracy": 0.5, "replies": ["a", "b"]}}, {})
    assert old.task_modes() == {
        "reasoning_off": {"accuracy": 0.5, "samples": 1, "replies": [["a"], ["b"]]}
    }


def test_a_bad_task_file_fails_before_the_reference_runs(mixed_ckpt_fp32, tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"type": "math", "question": 3, "answer": "1"}\n')
    out = tmp_path / "golden"
    args = ["reference", str(mixed_ckpt_fp32), str(out), "--tasks", str(bad)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "t.jsonl:1: needs a string 'question'" in result.output
    assert "Traceback" not in result.output and not out.exists()
    assert "golden of" not in result.output  # nothing streamed before the input was checked
