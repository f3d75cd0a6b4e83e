"""The README's command tours, generated: every ``$ cpmlive ...`` block of README.md is the output
of the commands listed here, run in this process through :func:`cpmlive.cli.main`.

``python -m cpmlive.tour`` prints every block; ``--write README.md`` rewrites the blocks in place
(each follows a ``<!-- tour:NAME -->`` line); ``--check README.md`` exits 1 when one differs.
``tests/test_tour.py`` runs the same commands and compares, so the README cannot drift from what
the shipped models print.

Output is normalised so it does not depend on the machine: the package's assets directory reads
``.../cpmlive/assets`` and the scratch directory the commands write to reads ``/tmp/tour``. A
command that fails shows its stderr and ``(exit N)``; a command that succeeds shows its stdout
alone (progress bars go to stderr). Every command runs on one thread, so the greedy outputs are
the same on every machine that runs the same torch.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from cpmlive.resources import ASSETS

SCRATCH = "/tmp/tour"  # the scratch directory as the README shows it
ARTICLE = ("新华社北京1月5日电 国务院总理李鹏今天在人民大会堂会见了来访的美国国务卿奥尔布赖特，"
           "双方就中美关系和共同关心的国际问题交换了意见。")

QUOTING = "宝玉笑道：“林妹妹，你这话说的是。”黛玉笑道：“宝哥哥，你这话说的是。”宝玉笑道："
PERSON = ('{"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", '
          '"maximum": 120}, "city": {"enum": ["北京", "上海"]}}, "required": ["name", "age", "city"], '
          '"additionalProperties": false}')

TOURS: dict[str, list[str]] = {
    "cli": [
        "cpmlive info demo",
        'cpmlive generate demo "宝玉笑道：" --max-new-tokens 24 --repetition-penalty 1.2',
        'cpmlive generate demo "中国人民" --max-new-tokens 8 --min-new-tokens 8 --json',
        'cpmlive fill demo "北京是中国的<mask>。" --json',
        'cpmlive tokenize demo "今天天气真好！" --json',
        'cpmlive tokenize demo "今天天气真好！" --hf --json',
        f"cpmlive convert demo {SCRATCH}/hf --to hf",
        f"cpmlive convert {SCRATCH}/hf {SCRATCH}/ours --dtype float16",
        f'cpmlive generate {SCRATCH}/ours "中国人民" --max-new-tokens 8 --min-new-tokens 8 --json',
        'cpmlive generate demo ""',
        'cpmlive fill demo "没有空"',
        'cpmlive generate /nonexistent "你好"',
        "cpmlive download not-a-repo-id",
    ],
    "title": [
        f'cpmlive title "{ARTICLE}" -n 3',
        'cpmlive title ""',
    ],
    "bee": [
        "cpmlive info bee-demo",
        """cpmlive bee bee-demo '{"input": "打开一个新的文本文档。", "prompt": "中翻英", "<ans>": ""}'""",
        """cpmlive bee bee-demo '{"input": "Select the text that you want to format.", "prompt": "英翻中", """
        """"<ans>": ""}' --json --num-beams 3 --repetition-penalty 1.2""",
        """cpmlive bee bee-demo '{"document": "在「格式」菜单中选择<mask_0>，然后单击<mask_1>。", "<ans>": """
        """{"<mask_0>": "", "<mask_1>": ""}}' --json --num-beams 3""",
        """cpmlive bee bee-demo '{"input": "学校", "question": "这个词的英文意思是？", "options": {"<option_0>": """
        """"apple", "<option_1>": "school", "<option_2>": "river", "<option_3>": "to run"}, "<ans>": ""}' --json""",
        """cpmlive bee bee-demo '{"input": "北京"}'""",
        """cpmlive bee bee-demo '{"input": {"<ans>": ""}, "<ans>": ""}'""",
        """cpmlive bee demo '{"input": "北京", "<ans>": ""}'""",
    ],
    "plan": [
        "cpmlive plan ant-10b --gpus 8 --gpu-memory 80GB",
        "cpmlive plan bee-10b --gpus 8 --gpu-memory 80GB",
        "cpmlive plan ant-10b --gpus 1 --gpu-memory 24GB",
        "cpmlive plan ant-10b --gpus 1 --gpu-memory 24GB --offload",
        "cpmlive plan bee-10b --gpus 1 --gpu-memory 24GB --offload",
        "cpmlive plan ant-10b --gpus 4 --gpu-memory 80GB --adapter lora",
    ],
    "cpm1": [
        "cpmlive info cpm1-demo",
        'cpmlive tokenize cpm1-demo "清华大学 计算机系" --json',
        'cpmlive generate cpm1-demo "中国的首都是" --max-new-tokens 24 --repetition-penalty 1.2',
        'cpmlive generate cpm1-demo "宝玉笑道：" --max-new-tokens 24 --repetition-penalty 1.2',
        'cpmlive generate cpm1-demo "新华社北京1月5日电" --max-new-tokens 24 --repetition-penalty 1.2 --json',
        'cpmlive fill cpm1-demo "北京是中国的<mask>。"',
    ],
    "engine": [
        f'cpmlive generate demo "{QUOTING}" --max-new-tokens 24 --min-new-tokens 24 --json',
        f'cpmlive generate demo "{QUOTING}" --max-new-tokens 24 --min-new-tokens 24 --json '
        "--prompt-lookup-num-tokens 4",
        f"cpmlive quantize demo {SCRATCH}/demo-int8 --bits 8",
        f'cpmlive generate demo "{QUOTING}" --max-new-tokens 24 --min-new-tokens 24 --json '
        f"--assistant-model {SCRATCH}/demo-int8",
        f"cpmlive generate llama-demo 个人信息： --max-new-tokens 60 --json-schema '{PERSON}'",
        "cpmlive generate llama-demo 电话： --max-new-tokens 16 --regex '1[3-9][0-9]{9}'",
        'cpmlive generate demo "你好" --json-object',
        "cpmlive generate llama-demo 你好 --regex '(abc'",
        'cpmlive generate demo "你好" --num-assistant-tokens 0',
    ],
    "llama": [
        'cpmlive tokenize llama-demo "清华大学 计算机系" --json',
        'cpmlive generate llama-demo "宝玉笑道：" --max-new-tokens 24 --repetition-penalty 1.2',
        'cpmlive generate llama-demo "中国的首都是" --max-new-tokens 12 --min-new-tokens 12 --json',
        f"cpmlive convert llama-demo {SCRATCH}/llama-hf --to hf",
        f"cpmlive convert {SCRATCH}/llama-hf {SCRATCH}/llama-q8.gguf --to gguf --dtype q8_0",
        f'cpmlive generate {SCRATCH}/llama-q8.gguf "宝玉笑道：" --max-new-tokens 24 --repetition-penalty 1.2',
        'cpmlive fill llama-demo "北京是中国的<mask>。"',
    ],
    "encoders": [
        'cpmlive tokenize t5-demo "清华大学 计算机系" --json',
        'cpmlive generate t5-demo "宝玉笑道：<extra_id_0>" --max-new-tokens 12',
        'cpmlive generate t5-demo "北京是中国的<extra_id_0>，也是全国的文化中心。" --max-new-tokens 8 --num-beams 3',
        'cpmlive tokenize cpm2-demo "清华大学 计算机系" --json',
        'cpmlive generate cpm2-demo "宝玉笑道：" --max-new-tokens 12 --num-beams 3',
        'cpmlive fill bert-demo "北京是中国的首<mask>。"',
        f"cpmlive convert cpm2-demo {SCRATCH}/cpm2-mc --to modelcenter",
        f'cpmlive generate {SCRATCH}/cpm2-mc "宝玉笑道：" --max-new-tokens 12 --num-beams 3',
        'cpmlive fill t5-demo "北京是中国的<mask>。"',
        'cpmlive generate bert-demo "你好"',
    ],
}


def run(command: str, scratch: Path) -> str:
    """What ``command`` prints, as the README shows it."""
    from cpmlive.cli import main

    argv = shlex.split(command.replace(SCRATCH, str(scratch)))
    if argv[0] != "cpmlive":
        raise ValueError(f"a tour command starts with cpmlive: {command}")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv[1:])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    text = out.getvalue().rstrip() if code == 0 else (out.getvalue() + err.getvalue()).rstrip()
    text = text.replace(str(scratch), SCRATCH).replace(str(ASSETS), ".../cpmlive/assets")
    return f"$ {command}\n{text}" + (f"\n(exit {code})" if code else "")


def render(name: str) -> str:
    """The text of tour ``name``'s block (without the fences)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="cpmlive-tour-") as scratch:
            return "\n\n".join(run(command, Path(scratch)) for command in TOURS[name]) + "\n"
    finally:
        torch.set_num_threads(threads)


def _block_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- tour:{re.escape(name)} -->\n```text\n)(.*?)(```)", re.DOTALL)


def readme_block(readme: str, name: str) -> str:
    """The body of README block ``name`` (raises KeyError when its marker is missing)."""
    match = _block_re(name).search(readme)
    if match is None:
        raise KeyError(f"README has no <!-- tour:{name} --> block")
    return match[2]


def rewrite(readme: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        readme_block(readme, name)
        readme = _block_re(name).sub(lambda m, body=body: m[1] + body + m[3], readme, count=1)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.tour", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(TOURS), help=f"tours to run (default: {' '.join(TOURS)})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="README", help="rewrite the blocks of this file")
    mode.add_argument("--check", type=Path, metavar="README", help="exit 1 when a block of this file differs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(TOURS))
    if unknown:
        parser.error(f"unknown tour {', '.join(unknown)} (known: {', '.join(TOURS)})")
    blocks = {name: render(name) for name in args.names}
    if args.write:
        args.write.write_text(rewrite(args.write.read_text(encoding="utf-8"), blocks), encoding="utf-8")
        print(f"rewrote {', '.join(blocks)} in {args.write}")
        return 0
    if args.check:
        readme = args.check.read_text(encoding="utf-8")
        stale = [name for name, body in blocks.items() if readme_block(readme, name) != body]
        print(f"stale: {', '.join(stale)}" if stale else "up to date")
        return 1 if stale else 0
    for name, body in blocks.items():
        print(f"<!-- tour:{name} -->\n```text\n{body}```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
