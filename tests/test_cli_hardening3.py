"""Issue 28, round 3 of hardening, in the CLI verbs: recipe overrides that reach list items and
follow any flag (point 11), the small items of point 12, and reproducible run files (point 14)."""

import errno
import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cpmlive.align.recipes import AlignConfig, align
from cpmlive.cli import main
from cpmlive.compress.pipeline import RUN_MARKER, CompressRecipe, compress
from cpmlive.compress.prune import warn_off_target
from cpmlive.compress.quantize import calibration_rows, quantize_model
from cpmlive.config import QuantConfig
from cpmlive.data import fetch
from cpmlive.data.store import TokenStore, prepare
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import load_model, save_checkpoint
from cpmlive.model.registry import preset_family
from cpmlive.recipe import apply_overrides
from cpmlive.serve.app import check_model
from cpmlive.tokenizer.vocab import build_vocab, save_vocab
from cpmlive.train.metrics import MetricsLog, read_records
from cpmlive.tune.delta import WEIGHTS_NAME, save_adapter
from cpmlive.tune.finetune import FinetuneConfig, Finetuner
from cpmlive.utils import atomic_write_text
from test_align import tiny_base, write_jsonl
from tiny_store import SENTENCES, make_model_and_store, recipe

RECIPE = {"steps": [{"prune": {"target": 0.5, "steps": 400}}, {"distill": {"steps": 200}}, {"quantize": {"bits": 8}}],
          "model_overrides": None, "seq_length": 256}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return make_model_and_store(tmp_path_factory.mktemp("hardening3"))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- point 11: overrides ----------------------------------------------------------------------


@pytest.mark.parametrize("override, path, value", [
    ("steps.0.prune.steps=20", ("steps", 0, "prune", "steps"), 20),
    ("steps[1].distill.steps=10", ("steps", 1, "distill", "steps"), 10),
    ("steps.0.steps=20", ("steps", 0, "prune", "steps"), 20),  # a step's settings named directly
    ("steps.-1.bits=4", ("steps", 2, "quantize", "bits"), 4),
    ("model_overrides.dim_model=96", ("model_overrides", "dim_model"), 96),
    ("a.b.c=1", ("a", "b", "c"), 1),
])
def test_overrides_reach_list_items_and_nested_mappings(override, path, value):
    data = apply_overrides(json.loads(json.dumps(RECIPE)), [override])
    for part in path:
        data = data[part]
    assert data == value


@pytest.mark.parametrize("override, message", [
    ("steps.5.steps=1", "steps has 3 items, no index 5"),
    ("steps.x.steps=1", "steps is a list: give an index"),
    ("seq_length.x=1", "seq_length is 256, not a mapping or list"),
    ("steps[x].y=1", "is not a dotted key"),
    ("a..b=1", "is not a dotted key"),
    ("steps.0.prune.0=1", "steps.0.prune is a mapping, not a list (no index 0)"),
])
def test_bad_override_paths_are_one_line(override, message):
    with pytest.raises(CpmliveError, match=re.escape(message)):
        apply_overrides(json.loads(json.dumps(RECIPE)), [override])


def test_compress_takes_overrides_after_recipe_and_refuses_a_bad_index_in_one_line(setup, tmp_path, capsys):
    model_dir, data = setup
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {data}\nsteps:\n  - quantize: {{bits: 8}}\n", encoding="utf-8")
    code = main(["compress", str(model_dir), str(tmp_path / "out"), "--recipe", str(path), "seed=1",
                 "steps.3.bits=4"])
    assert code == 2 and "steps has 1 item, no index 3" in error_line(capsys)
    code = main(["compress", str(model_dir), str(tmp_path / "out"), "--recipe", str(path), "steps[0].bits=4",
                 "progress=false"])
    assert code == 0
    assert load_model(tmp_path / "out").config.quantization.bits == 4


def test_finetune_takes_overrides_on_both_sides_of_its_flags(tmp_path, capsys):
    code = main(["finetune", "lr=0.5", "--data", str(tmp_path / "none.jsonl"), "delta.r=-3"])
    assert code == 2 and "delta" in error_line(capsys)  # parsed, then refused by the recipe


def test_data_prepare_max_docs_keeps_the_first_documents_of_each_source(tmp_path):
    lines = [f"{SENTENCES[i % 4]}第{i}段。" for i in range(50)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    save_vocab(build_vocab(lines, 200), vocab)
    stats = prepare([str(corpus)], vocab, tmp_path / "store", val_fraction=0.1, progress=False, workers=1, max_docs=12)
    assert stats["documents"] == 12 and stats["max_docs"] == 12
    assert (TokenStore(tmp_path / "store", "train").num_documents
            + TokenStore(tmp_path / "store", "val").num_documents == 12)


def test_quick_compress_recipe_states_its_run_time_and_reads():
    root = Path(__file__).resolve().parents[1]
    values = apply_overrides(yaml.safe_load((root / "recipes" / "compress-quick.yaml").read_text()), ["data=x"])
    assert CompressRecipe.from_dict(values).run_time


# ---- point 12: the small items ----------------------------------------------------------------------


def test_info_counts_quantized_weights_as_the_weights_they_stand_for(setup, tmp_path, capsys):
    model_dir, _ = setup
    model = load_model(model_dir)
    floats = model.num_parameters()
    quantized = quantize_model(load_model(model_dir), QuantConfig(bits=4, group_size=16))
    assert quantized.num_parameters() == floats
    save_checkpoint(quantized.state_dict(), quantized.config, tmp_path / "int4", vocab=model_dir / "vocab.txt")
    assert main(["info", str(tmp_path / "int4"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == floats


def test_a_prune_far_from_its_target_is_warned_about(setup, tmp_path):
    model_dir, data = setup
    steps = [{"prune": {"target": 0.4, "steps": 1, "target_warmup_steps": 0}}]
    with pytest.warns(UserWarning, match=r"prune kept 100% of the prunable parameters against a target of 40%"):
        compress(model_dir, tmp_path / "pruned", recipe(data, steps=steps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_off_target(0.45, 0.4, 10)  # within the slack: nothing to say


def test_title_refuses_text_without_chinese(capsys):
    assert main(["title", "The quick brown fox jumps over the lazy dog."]) == 2
    assert "Chinese-only" in error_line(capsys)


def test_title_refuses_an_article_and_a_file_together(tmp_path, capsys):
    article = tmp_path / "a.txt"
    article.write_text("北京今天下雪。", encoding="utf-8")
    assert main(["title", "上海今天下雨。", "--file", str(article)]) == 2
    assert "not both" in error_line(capsys)


def test_small_calibration_text_is_warned_with_its_real_size():
    with pytest.warns(UserWarning, match=r"gives 1 row of up to 256 tokens \(10 tokens\), not the 64 asked for"):
        rows = calibration_rows([list(range(10))], samples=64, length=256)
    assert rows == [list(range(10))]


def test_gptq_on_cpm1_is_refused_naming_the_families_that_calibrate(tmp_path, capsys):
    calibration = tmp_path / "cal.txt"
    calibration.write_text("北京是中国的首都。\n", encoding="utf-8")
    code = main(["quantize", "cpm1-demo", str(tmp_path / "q"), "--bits", "8", "--method", "gptq",
                 "--calibration", str(calibration)])
    refusal = "GPTQ/AWQ calibration is CPM-Ant, CPM-Bee or Llama-family's (CPM-1: use --method rtn)"
    assert code == 2 and refusal in error_line(capsys)
    assert not (tmp_path / "q").exists()


def test_serve_refuses_a_directory_that_holds_no_checkpoint_before_serving(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(CpmliveError, match="unknown checkpoint format"):
        check_model(tmp_path / "notamodel")
    assert main(["serve", str(tmp_path / "notamodel"), "--port", "0"]) == 2
    assert "serving" not in capsys.readouterr().out


def test_fill_names_max_new_tokens_when_the_blanks_do_not_fit(capsys):
    assert main(["fill", "demo", "今天<mask>很好", "--max-new-tokens", "10000"]) == 2
    line = error_line(capsys)
    assert "max_new_tokens" in line and "10000" in line and "prompt is" not in line


def test_chat_hint_names_no_verb_that_refuses_the_family():
    from cpmlive.api import LM

    kind = preset_family("cpm1-tiny")
    model = kind.model(kind.presets["cpm1-tiny"]())
    lm = LM(model, SimpleNamespace(vocab_size=model.config.vocab_size))
    with pytest.raises(CpmliveError) as caught:
        lm.chat_template()
    assert "align sft" not in str(caught.value) and "CPM-Ant" in str(caught.value)


def test_an_unrelated_run_directory_is_not_called_an_earlier_compress_run(setup, tmp_path):
    model_dir, data = setup
    (tmp_path / "out.run").mkdir()
    (tmp_path / "out.run" / "notes.txt").write_text("mine", encoding="utf-8")
    quantize = recipe(data, steps=[{"quantize": {"bits": 8}}])
    with pytest.raises(CpmliveError, match="is not a compress run"):
        compress(model_dir, tmp_path / "out", quantize)
    compress(model_dir, tmp_path / "other", quantize)
    assert (tmp_path / "other.run" / RUN_MARKER).is_file()
    with pytest.raises(CpmliveError, match="holds an earlier compress run"):
        compress(model_dir, tmp_path / "other", quantize, force=True)


def test_evaluate_adapter_run_dir_means_its_best_adapter(tmp_path, capsys):
    from cpmlive.cli.common import run_adapter

    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert run_adapter(str(tmp_path / "run")) == str(tmp_path / "run" / "best")
    assert "using its best adapter" in capsys.readouterr().err
    assert run_adapter(str(tmp_path / "run" / "best")) == str(tmp_path / "run" / "best")
    assert run_adapter("headline") == "headline"


def test_a_failed_align_leaves_no_out_directory(tmp_path):
    base = tiny_base(tmp_path / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    config = AlignConfig(method="sft", model=str(base), data=str(bad), out=str(tmp_path / "run"), progress=False)
    with pytest.raises(CpmliveError):
        align(config)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CpmliveError):
        align(AlignConfig(method="sft", model=str(base), data=str(bad), out=str(tmp_path / "empty"), progress=False))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_failed_run_keeps_the_best_adapter_validation_wrote(tmp_path):
    """A run that fails after validation saved its best adapter, but before any checkpoint, keeps it."""
    from cpmlive.train.checkpoints import cleaned_up_on_failure

    run = tmp_path / "run"
    with pytest.raises(MemoryError), cleaned_up_on_failure(run, keep=("best",)):
        (run / "best").mkdir(parents=True)
        (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
        raise MemoryError
    assert (run / "best").is_dir() and (run / "metrics.jsonl").is_file()


def fake_pip_download(monkeypatch, calls: list) -> None:
    """``pip download`` replaced by a zip holding ``pkg/a.txt`` ("A") and ``pkg/b.txt`` ("B")."""
    import zipfile

    def download(package: str, version: str, into: Path) -> Path:
        calls.append(package)
        archive = into / f"{package}-{version}.zip"
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr("pkg/a.txt", "A")
            bundle.writestr("pkg/b.txt", "B")
        return archive

    monkeypatch.setattr(fetch, "_pip_download", download)


def test_a_package_archive_is_downloaded_once_for_all_its_members(tmp_path, monkeypatch):
    calls: list = []
    fake_pip_download(monkeypatch, calls)
    first = fetch.fetch_package_file("pkg", "1.0", "pkg/a.txt", cache_dir=tmp_path)
    second = fetch.fetch_package_file("pkg", "1.0", "pkg/b.txt", cache_dir=tmp_path)
    assert (first.read_text(), second.read_text(), calls) == ("A", "B", ["pkg"])


def test_a_damaged_cached_archive_is_fetched_once_more(tmp_path, monkeypatch):
    calls: list = []
    torn = tmp_path / fetch.ARCHIVES / "pkg-1.0" / "pkg-1.0.zip"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"PK\x03\x04 torn")
    fake_pip_download(monkeypatch, calls)
    assert fetch.fetch_package_file("pkg", "1.0", "pkg/a.txt", cache_dir=tmp_path).read_text() == "A"
    assert calls == ["pkg"]


def test_a_failed_write_names_the_file_meant(tmp_path, monkeypatch):
    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic_write_text(tmp_path / "config.yaml", "x")
    assert caught.value.filename == str(tmp_path / "config.yaml")
    assert not list(tmp_path.iterdir())


def test_a_metrics_write_that_fails_names_the_run_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    log = MetricsLog(tmp_path)
    with pytest.raises(CpmliveError, match=f"{tmp_path / 'metrics.jsonl'}: cannot write"):
        log.write({"type": "train", "step": 1})


# ---- point 14: reproducible files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tune_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune3")
    rows = [{"input": f"本报{c}电，今天{c}市民{t}。", "output": f"{c}{t}"} for c in ("北京", "上海", "广州", "深圳")
            for t in ("下雪", "开会", "修路", "植树")]
    return {"base": tiny_base(root / "base"), "train": write_jsonl(root / "train.jsonl", rows[:12]),
            "dev": write_jsonl(root / "dev.jsonl", rows[12:]), "root": root}


def tune(world: dict[str, Path], out: str, **extra) -> FinetuneConfig:
    values = {"model": str(world["base"]), "data": str(world["train"]), "eval": str(world["dev"]),
              "out": str(world["root"] / out), "batch_size": 4, "max_steps": 8, "lr": 0.01, "warmup_steps": 1,
              "eval_every": 4, "save_every": 4, "precision": "fp32", "progress": False, "max_input_tokens": 24,
              "max_output_tokens": 6, **extra}
    return FinetuneConfig.from_dict(values)


def test_identical_runs_write_identical_adapter_bytes(tune_world):
    for name in ("one", "two"):
        Finetuner(tune(tune_world, name, max_steps=2, eval_every=2, save_every=2)).run()
    one, two = (tune_world["root"] / name / "best" / WEIGHTS_NAME for name in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    tuner = Finetuner(tune(tune_world, "three", max_steps=1))
    saved = set()
    for index in range(8):
        saved.add((save_adapter(tuner.model, tune_world["root"] / f"again{index}") / WEIGHTS_NAME).read_bytes())
    assert len(saved) == 1


class Crashing(Finetuner):
    """Dies before step 7, after the step-4 checkpoint and the records of steps 5 and 6."""

    def train_step(self):
        if self.position.step == 6:
            raise RuntimeError("crash")
        return super().train_step()


def train_records(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(run_dir) if r.get("type") == "train"]


def test_a_resumed_run_keeps_one_record_per_step(tune_world):
    Finetuner(tune(tune_world, "whole")).run()
    with pytest.raises(RuntimeError):
        Crashing(tune(tune_world, "crashed")).run()
    assert [step for step, _ in train_records(tune_world["root"] / "crashed")] == [1, 2, 3, 4, 5, 6]
    Finetuner(tune(tune_world, "crashed"), resume="auto").run()
    resumed, whole = train_records(tune_world["root"] / "crashed"), train_records(tune_world["root"] / "whole")
    assert [step for step, _ in resumed] == list(range(1, 9))
    assert resumed == whole
    evals = [r["step"] for r in read_records(tune_world["root"] / "crashed") if r.get("type") == "eval"]
    assert evals == sorted(set(evals))
