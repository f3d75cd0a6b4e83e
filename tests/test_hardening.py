"""What a careful user hits: writers that must not destroy, inference that must reproduce, bad
input that must be one line, messages that must point at the fix, and exports that must behave
the same in the other library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import cpmlive
from cpmlive.cli import main
from cpmlive.model.ant.config import AntConfig
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import GenerationConfig
from cpmlive.apps.headline import TitleOptions
from cpmlive.model.ant.convert import convert, load_any
from cpmlive.tune.task import classify_scores

from conftest import ANT_VOCAB

ARTICLE = ("新华社北京1月5日电 国务院总理李鹏今天在人民大会堂会见了来访的美国国务卿奥尔布赖特，"
           "双方就中美关系和共同关心的国际问题交换了意见。")


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], fragment: str) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a usage error itself (still one line, exit 2)
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and fragment in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def demo_lm() -> cpmlive.LM:
    return cpmlive.load("demo")


# ---- 1. writers never destroy what the user did not name ---------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_convert_refuses_a_non_empty_directory_and_force_keeps_other_files(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.md").write_text("mine", encoding="utf-8")
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older write")
    before = snapshot(dst)
    one_line_error(capsys, ["convert", "demo", dst, "--to", "hf"], "not empty")
    assert snapshot(dst) == before
    assert main(["convert", "demo", str(dst), "--to", "hf", "--force"]) == 0
    names = {p.name for p in dst.iterdir()}
    assert (dst / "notes.md").read_text(encoding="utf-8") == "mine"
    assert "model-00001-of-00002.safetensors" not in names  # the older write's shard, not the user's file
    assert {"config.json", "model.safetensors", "vocab.txt", "generation_config.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    state, _ = load_any(dst)
    assert state.keys() == load_any("demo")[0].keys()


def test_convert_refuses_an_existing_file_and_leaves_no_hidden_copy(tmp_path, capsys):
    target = tmp_path / "model.pt"
    target.write_bytes(b"precious")
    one_line_error(capsys, ["convert", "demo", target, "--to", "hf"], "is a file")
    one_line_error(capsys, ["convert", "demo", target, "--to", "openbmb"], "already exists")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_openbmb_conversion_never_replaces_another_models_vocabulary(tmp_path, capsys):
    folder = tmp_path / "openbmb"
    assert main(["convert", "demo", str(folder / "demo.pt"), "--to", "openbmb"]) == 0
    demo_vocab = (folder / "vocab.txt").read_bytes()
    other = tmp_path / "other"
    convert("demo", other)  # a second model whose vocabulary differs
    tokens = (other / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[-2:] = tokens[-1:-3:-1]
    (other / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match="vocab.txt: already exists"):
        convert(other, folder / "other.pt", to="openbmb")
    assert (folder / "vocab.txt").read_bytes() == demo_vocab
    assert not (folder / "other.pt").exists()
    # the same vocabulary again is no conflict
    assert main(["convert", "demo", str(folder / "again.pt"), "--to", "openbmb"]) == 0


def test_every_user_named_writer_refuses_to_overwrite(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好，我们去公园散步。\n" * 5, encoding="utf-8")
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me", encoding="utf-8")
    one_line_error(capsys, ["vocab", "build", corpus, "--size", "20", "--out", taken], "already exists")
    full = tmp_path / "full"
    full.mkdir()
    (full / "data.bin").write_bytes(b"another data set")
    one_line_error(capsys, ["data", "prepare", corpus, "--vocab", ANT_VOCAB, "--out", full, "--quiet"],
                   "not empty")
    one_line_error(capsys, ["merge", "demo", "headline", full], "not empty")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "test.jsonl").write_text("{}\n", encoding="utf-8")
    one_line_error(capsys, ["data", "headlines", "--out", splits], "test.jsonl: already exists")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("mine\n", encoding="utf-8")
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"input": "北京", "output": "首都"}) + "\n", encoding="utf-8")
    one_line_error(capsys, ["evaluate", "demo", "--data", data, "--predictions", predictions], "already exists")
    assert taken.read_text(encoding="utf-8") == "keep me" and predictions.read_text(encoding="utf-8") == "mine\n"
    assert (full / "data.bin").read_bytes() == b"another data set"


# ---- 2. inference with adapters is bit-reproducible ---------------------------------------------------


def test_adapters_load_in_eval_mode_and_repeat_exactly():
    lm = cpmlive.load("demo", adapter=["headline", "sentiment"])
    assert not any(module.training for module in lm.model.modules())
    texts = ["房间很干净，服务也好。", "太差了，再也不来。"]
    with lm.using("sentiment"), torch.inference_mode():
        first = classify_scores(lm.model, lm.tokenizer, lm.task, texts)
        assert all(torch.equal(first, classify_scores(lm.model, lm.tokenizer, lm.task, texts)) for _ in range(3))
    with lm.using("headline"):
        runs = {tuple(lm.generate_ids([ARTICLE], max_new_tokens=12)[0]) for _ in range(4)}
    assert len(runs) == 1


def test_attach_gives_new_adapter_modules_the_models_mode(demo_lm):
    from cpmlive.tune import delta

    model = cpmlive.load("demo").model
    delta.attach(model, delta.DeltaConfig(method="lora", dropout=0.5))
    assert not any(m.training for m in model.modules())
    model.train()
    delta.attach(model, delta.DeltaConfig(method="lora", dropout=0.5), name="second")
    assert all(m.training for m in model.modules())


# ---- 3. the README's headline figures come from one command --------------------------------------------


def test_evaluate_titles_is_the_title_verbs_top_choice(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"input": ARTICLE, "output": "李鹏会见奥尔布赖特"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    assert main(["evaluate", "demo", "--adapter", "headline", "--data", str(data), "--titles", "--json",
                 "--predictions", str(predictions)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 1 and metrics["rougeL"] > 0
    got = json.loads(predictions.read_text(encoding="utf-8"))["prediction"]
    assert main(["title", "-n", "1", ARTICLE]) == 0
    assert capsys.readouterr().out.strip() == got


def test_evaluate_titles_options_are_the_title_verbs():
    from cpmlive.cli import build_parser
    from cpmlive.cli.evaluate import title_options

    def options(*extra: str) -> TitleOptions:
        return title_options(build_parser().parse_args(["evaluate", "demo", "--data", "x", "--titles", *extra]))

    assert options() == TitleOptions(n=1)
    assert options("--lead-sentences", "0") == TitleOptions(n=1, lead_sentences=0)
    assert options("--num-beams", "3") == TitleOptions(n=1, num_beams=3)


# ---- 4. bad values are one line where they enter ----------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "demo", "你好", "--max-new-tokens", "100000000000"], "exceed the model's 480 positions"),
    (["generate", "demo", "你好", "--max-new-tokens", "479"], "at most 478 new tokens"),
    (["generate", "demo", "你好", "--max-new-tokens", "abc"], "'abc' is not an integer"),
    (["generate", "demo", "你好", "--top-p", "nan"], "not a finite number"),
    (["generate", "demo", "你好", "--num-beams", "100000"], "num_beams must be in [1, 64]"),
    (["serve", "--port", "70000"], "out of range"),
    (["dashboard", "runs", "--port", "-1"], "out of range"),
    (["convert", "demo", "/proc/nonexistent/dir"], "No such file or directory"),
])
def test_bad_values_are_one_line(capsys, argv, fragment):
    one_line_error(capsys, argv, fragment)


def test_convert_to_a_path_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    one_line_error(capsys, ["convert", "demo", blocker / "out"], "is a file, not a directory")


def test_generation_config_checks_types_from_any_caller(demo_lm):
    with pytest.raises(CpmliveError, match="max_new_tokens must be an integer"):
        GenerationConfig(max_new_tokens="5")
    with pytest.raises(CpmliveError, match="do_sample must be true or false"):
        GenerationConfig(do_sample="yes")
    with pytest.raises(CpmliveError, match="positions"):  # the cache itself refuses, for every decoder
        demo_lm.model.new_cache(1, demo_lm.config.max_length + 1)
    with pytest.raises(CpmliveError, match=r"up to 479 tokens \(max_new_tokens.* exceed the model's 480 positions"):
        demo_lm.fill("今天<mask>", max_new_tokens=479)


# ---- 6. messages that point at the fix ------------------------------------------------------------------


def test_checkpoint_without_vocab_says_so(tmp_path, capsys):
    convert("demo", tmp_path / "novocab")
    (tmp_path / "novocab" / "vocab.txt").unlink()
    one_line_error(capsys, ["generate", tmp_path / "novocab", "你好"], "no vocab.txt in the checkpoint")
    one_line_error(capsys, ["generate", "tiny", "你好"], "pass vocab=PATH")


def test_hf_and_openbmb_checkpoints_load_as_they_are(tmp_path, demo_lm):
    convert("demo", tmp_path / "hf", to="hf")
    convert("demo", tmp_path / "openbmb" / "demo.pt", to="openbmb")
    expected = demo_lm.generate_ids(["中国人民"], max_new_tokens=8)
    for source in (tmp_path / "hf", tmp_path / "openbmb" / "demo.pt"):
        assert cpmlive.load(source).generate_ids(["中国人民"], max_new_tokens=8) == expected


def test_config_claiming_huge_depth_is_refused_before_building(tmp_path, capsys, monkeypatch):
    import cpmlive.model.ant.model as ant

    convert("demo", tmp_path / "deep")
    config = json.loads((tmp_path / "deep" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "deep" / "config.json").write_text(json.dumps({**config, "num_layers": 100000}), encoding="utf-8")
    def refuse_to_build(*args, **kwargs):
        raise AssertionError("a model of the claimed depth was built")

    monkeypatch.setattr(ant.CpmAnt, "__init__", refuse_to_build)
    for verb in ("info", "generate"):
        one_line_error(capsys, [verb, tmp_path / "deep", *(["你好"] if verb == "generate" else [])],
                       "the config has 100000 layers, the weights 8")


@pytest.mark.parametrize("key, value, fragment", [
    ("eps", -1, "eps must be > 0"), ("dropout_p", 1.5, "dropout_p must be in [0, 1)"),
    ("half", "no", "half must be true or false"), ("max_length", 32, "max_length (32) must exceed"),
])
def test_config_values_are_checked(key, value, fragment):
    with pytest.raises(CpmliveError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        AntConfig.from_dict({**AntConfig().to_dict(), key: value})


def test_vocab_build_refuses_a_size_the_corpus_cannot_fill(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好。\n", encoding="utf-8")
    one_line_error(capsys, ["vocab", "build", corpus, "--size", "100000", "--out", tmp_path / "v.txt"],
                   "a --size of at most")
    assert not (tmp_path / "v.txt").exists()


# ---- 7. exports behave the same in the other library ----------------------------------------------------


def test_hf_generate_with_default_arguments_stops_where_ours_does(tmp_path, demo_lm):
    convert("demo", tmp_path / "hf", to="hf")
    hf = transformers.CpmAntForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.max_new_tokens == 64  # LM.generate's and `cpmlive generate`'s default
    ids = tokenizer("中国人民", return_tensors="pt").input_ids
    theirs = hf.generate(ids)[0, ids.size(1):].tolist()
    ours = demo_lm.generate_ids(["中国人民"])[0]
    assert len(ours) < 10  # this prompt ends on </s>: HF must stop there too, not run on
    assert theirs == ours + [demo_lm.tokenizer.eos_id]


def test_max_length_survives_hf_and_openbmb_round_trips(tmp_path):
    from cpmlive.resources import demo_dir

    original = AntConfig.load(demo_dir() / "config.json")
    assert original.max_length != AntConfig().max_length
    convert("demo", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "from-hf")
    convert("demo", tmp_path / "ob" / "demo.pt", to="openbmb")
    convert(tmp_path / "ob" / "demo.pt", tmp_path / "from-openbmb")
    for back in ("from-hf", "from-openbmb"):
        assert AntConfig.load(tmp_path / back / "config.json") == original
