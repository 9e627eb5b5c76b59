"""Calibration data: built-in sets, user files, deterministic windows, hashes, errors."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.quantize import calib
from builder.quantize.calib import CalibrationDataError, build_calibration_set, load_samples


@pytest.fixture(scope="module")
def tokenizer(mixed_ckpt):
    return calib.load_tokenizer(mixed_ckpt)


def test_builtin_set_mixes_wiki_and_every_chat_category():
    samples = load_samples("builtin")
    sources = {s.source.split(":")[0] for s in samples}
    assert {"wiki", "prompts", "arith", "choice"} <= sources
    categories = {s.source.split(":")[1] for s in samples if s.source.startswith("prompts:")}
    assert categories == {"math", "multiple_choice", "code", "tool_calling"}
    systems = {s.messages[0][1].split("\n")[0] for s in samples if s.messages}
    assert systems == {"detailed thinking on", "detailed thinking off"}
    thinking = [
        s for s in samples if s.messages and s.messages[0][1].startswith("detailed thinking on")
    ]
    assert all(s.messages[-1][1].startswith("<think>\n") for s in thinking)


def test_heldout_articles_never_calibrate():
    calibration = {s.source for s in calib.wiki_samples()}
    heldout = {s.source for s in calib.wiki_samples(heldout=True)}
    assert calibration and heldout and not calibration & heldout
    # sha256's first byte is uniform: each article is held out with p = HELDOUT_EIGHTHS / 8,
    # so the fraction lies within 5 binomial standard deviations of p (a bound, not a
    # measurement; the article list is fixed, so the test is deterministic).
    total = len(heldout) + len(calibration)
    p = calib.HELDOUT_EIGHTHS / 8
    assert abs(len(heldout) / total - p) < 5 * math.sqrt(p * (1 - p) / total)
    text = calib.heldout_text()
    assert all(s.text not in text for s in calib.wiki_samples()[:200])


def test_windows_are_deterministic_and_seeded(tokenizer):
    a = build_calibration_set("builtin", tokenizer, 4, 64, seed=0)
    b = build_calibration_set("builtin", tokenizer, 4, 64, seed=0)
    c = build_calibration_set("builtin", tokenizer, 4, 64, seed=1)
    assert a.windows.shape == (4, 64)
    assert a.windows.equal(b.windows) and a.sha256 == b.sha256
    assert not a.windows.equal(c.windows) and a.sha256 != c.sha256
    assert a.describe()["samples_used"] >= 1


def test_chat_samples_use_the_checkpoint_template(tokenizer):
    sample = calib.prompt_samples()[0]
    text = tokenizer.decode(calib.sample_tokens(sample, tokenizer))
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on"
    )
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n<think>" in text


def test_user_files_txt_jsonl_parquet(tmp_path, tokenizer):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph.\n\nSecond paragraph.\n\n\n")
    assert [s.text for s in load_samples(str(txt))] == ["First paragraph.", "Second paragraph."]

    jsonl = tmp_path / "mix.jsonl"
    lines = [
        {"text": "plain text"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"text": "   "},
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples = load_samples(str(jsonl))
    assert samples[0].text == "plain text"
    assert samples[1].messages == (("user", "hi"), ("assistant", "hello"))
    assert len(samples) == 2

    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["alpha " * 50, "beta " * 50]}), parquet)
    windows = build_calibration_set(str(parquet), tokenizer, 2, 128).windows
    assert tokenizer.decode(windows[0][:5]) == "alpha"[:5]

    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "x"}]]}), chats)
    assert load_samples(str(chats))[0].messages == (("user", "x"),)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n", "the calibration data is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
        (
            "field.jsonl",
            '{"prompt": "x"}\n',
            "field.jsonl:1: expected a 'text' or 'messages' field",
        ),
        ("roles.jsonl", '{"messages": [{"content": "x"}]}\n', "messages[0] needs string 'role'"),
        ("data.csv", "a,b\n", "unsupported calibration file type"),
        ("latin1.txt", b"caf\xe9", "latin1.txt: unreadable"),
        ("broken.parquet", b"PAR1 not really", "broken.parquet: unreadable parquet file"),
    ],
)
def test_bad_user_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CalibrationDataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_samples(str(path))


def test_missing_file_and_parquet_without_text_column(tmp_path):
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_samples(str(tmp_path / "absent.jsonl"))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), other)
    with pytest.raises(CalibrationDataError, match="needs a 'text' or 'messages' column"):
        load_samples(str(other))


def test_too_short_data_says_how_much_is_missing(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(
        CalibrationDataError, match=r"too short: 1 sample\(s\) give 18 tokens .* needs 512"
    ):
        build_calibration_set(str(short), tokenizer, 4, 128)


def test_calib_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv(calib.CALIB_ENV, str(tmp_path))
    with pytest.raises(CalibrationDataError, match="calibration data directory not found"):
        calib.calib_dir()
    (tmp_path / "prompts.jsonl").write_text("")
    assert calib.calib_dir() == tmp_path
