"""Task JSONL files for `cpmlive finetune`: formats, and every error naming file:line."""

import json
from pathlib import Path

import pytest

from cpmlive.cli import build_parser, main
from cpmlive.data.tasks import Example, check_labels, read_examples, write_jsonl, write_splits
from cpmlive.errors import CpmliveError


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)


def test_generation_format_keeps_extra_fields_and_line_numbers(tmp_path):
    path = write(tmp_path / "gen.jsonl", "\ufeff" + lines(
        {"input": "新华社北京电 今天…", "output": "标题一", "strict": True, "line": 7},
        "",
        "   ",
        {"input": "正文二", "output": "标题二"},
    ))
    examples = read_examples(path, "generate")
    assert examples == [
        Example("新华社北京电 今天…", "标题一", {"strict": True, "line": 7}, 1),
        Example("正文二", "标题二", {}, 4),
    ]


def test_classification_format(tmp_path):
    path = write(tmp_path / "cls.jsonl", lines({"input": "房间很干净", "label": "正面"},
                                               {"label": "负面", "input": "太吵了", "id": 3}))
    examples = read_examples(path, "classify")
    assert [(e.input, e.target, e.extra, e.line) for e in examples] == [
        ("房间很干净", "正面", {}, 1), ("太吵了", "负面", {"id": 3}, 2)]


def test_file_without_final_newline_and_crlf(tmp_path):
    path = write(tmp_path / "crlf.jsonl", '{"input": "a", "output": "b"}\r\n{"input": "c", "output": "d"}')
    assert [(e.input, e.target, e.line) for e in read_examples(path, "generate")] == [("a", "b", 1), ("c", "d", 2)]


BAD_LINES = [
    ('{"input": "a", "output": ', "not valid JSON"),
    ('["input", "output"]', "expected a JSON object, got a list"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"output": "b"}', 'missing field "input"'),
    ('{"input": "a"}', 'missing field "output"'),
    ('{"input": "a", "label": "b"}', 'missing field "output" (it has "label": is it a classify file?)'),
    ('{"input": 3, "output": "b"}', 'field "input" must be a string, not a number'),
    ('{"input": "a", "output": null}', 'field "output" must be a string, not null'),
    ('{"input": "a", "output": ["b"]}', 'field "output" must be a string, not a list'),
    ('{"input": "  ", "output": "b"}', 'field "input" is empty'),
    ('{"input": "a", "output": ""}', 'field "output" is empty'),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "task.jsonl", lines({"input": "ok", "output": "fine"}, "", bad))
    with pytest.raises(CpmliveError) as info:
        read_examples(path, "generate")
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_classification_errors(tmp_path):
    path = write(tmp_path / "cls.jsonl", lines({"input": "a", "label": 1}))
    with pytest.raises(CpmliveError, match=r'cls\.jsonl:1: field "label" must be a string, not a number'):
        read_examples(path, "classify")
    path = write(tmp_path / "gen.jsonl", lines({"input": "a", "output": "b"}))
    with pytest.raises(CpmliveError, match=r'gen\.jsonl:1: missing field "label" \(it has "output": is it a generate'):
        read_examples(path, "classify")


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "latin.jsonl", lines({"input": "a", "output": "b"}).encode() + b'{"input": "caf\xe9"}\n')
    with pytest.raises(CpmliveError, match=r"latin\.jsonl:2: not UTF-8 text \(bad byte at column 15\)"):
        read_examples(path, "generate")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path / "empty.jsonl", content)
    with pytest.raises(CpmliveError, match=r"empty\.jsonl: empty file, no examples"):
        read_examples(path, "generate")


def test_missing_file_directory_and_unknown_task(tmp_path):
    with pytest.raises(CpmliveError, match=r"nope\.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl", "generate")
    with pytest.raises(CpmliveError, match="is a directory"):
        read_examples(tmp_path, "generate")
    with pytest.raises(CpmliveError, match="unknown task 'summarize'"):
        read_examples(tmp_path / "nope.jsonl", "summarize")


def test_check_labels_names_the_line(tmp_path):
    path = write(tmp_path / "dev.jsonl", lines({"input": "a", "label": "正面"}, {"input": "b", "label": "中性"}))
    examples = read_examples(path, "classify")
    check_labels(examples[:1], ["正面", "负面"], path)
    with pytest.raises(CpmliveError) as info:
        check_labels(examples, ["正面", "负面"], path)
    assert str(info.value) == f"{path}:2: label '中性' was not seen in training (training labels: 正面, 负面)"


def test_write_jsonl_round_trip(tmp_path):
    records = [{"input": "正文", "output": "标题", "strict": False}]
    write_jsonl(tmp_path / "a.jsonl", records)
    assert ((tmp_path / "a.jsonl").read_text(encoding="utf-8")
            == '{"input": "正文", "output": "标题", "strict": false}\n')
    write_splits(tmp_path / "new" / "dir", {"train": records, "test": []})
    assert read_examples(tmp_path / "new" / "dir" / "train.jsonl", "generate")[0].extra == {"strict": False}
    assert (tmp_path / "new" / "dir" / "test.jsonl").read_bytes() == b""


def test_write_splits_into_a_file_is_one_error(tmp_path):
    blocker = write(tmp_path / "file", "x")
    with pytest.raises(CpmliveError, match="cannot create output directory"):
        write_splits(blocker, {"train": []})


# ---- through the CLI ---------------------------------------------------------------------------


def assert_one_line_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and all(f in err for f in fragments), err


def has_verb(name: str) -> bool:
    return name in build_parser()._subparsers._group_actions[0].choices


@pytest.mark.skipif(not has_verb("finetune"), reason="no finetune verb in this checkout")
@pytest.mark.parametrize("task, bad, fragment", [
    ("generate", '{"input": "a"}', ':2: missing field "output"'),
    ("classify", "{oops", ":2: not valid JSON"),
    ("generate", "", "empty file, no examples"),
])
def test_finetune_rejects_bad_task_file(tmp_path, capsys, task, bad, fragment):
    good = {"input": "a", "output": "b"} if task == "generate" else {"input": "a", "label": "b"}
    data = write(tmp_path / "train.jsonl", lines(good, bad) if bad else "")
    code = main(["finetune", "--model", "demo", "--task", task, "--data", str(data), "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, str(data), fragment)


@pytest.mark.skipif(not has_verb("finetune"), reason="no finetune verb in this checkout")
def test_finetune_rejects_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    code = main(["finetune", "--model", "demo", "--task", "generate", "--data", str(missing),
                 "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, f"{missing}: no such file")


def test_data_verbs_report_unwritable_out(tmp_path, capsys):
    blocker = write(tmp_path / "file", "x")
    for verb in ("headlines", "sentiment"):
        code = main(["data", verb, "--out", str(blocker / "sub")])
        assert_one_line_error(capsys, code, "is a file, not a directory")
