"""A tiny model and token store for the compression tests (test_compress, test_sparsity)."""

from pathlib import Path

from cpmlive.compress.pipeline import CompressRecipe
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.data.store import prepare
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.tokenizer.vocab import build_vocab, save_vocab

SENTENCES = ["今天天气很好，我们一起去公园散步，看见很多人在湖边钓鱼。", "北京是中国的首都，也是全国的政治和文化中心。",
             "春天来了，小草从地下探出头来，柳树抽出了嫩绿的枝条。",
             "新华社记者报道，国务院总理今天会见了来访的外国客人。"]


def make_model_and_store(root: Path) -> tuple[Path, Path]:
    lines = [f"{SENTENCES[i % 4]}{SENTENCES[(i * 3 + 1) % 4]}第{i}段。" for i in range(160)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = root / "vocab.txt"
    save_vocab(build_vocab(lines, 300), vocab)
    data = root / "data"
    prepare([str(corpus)], vocab, data, val_fraction=0.05, progress=False, workers=1)
    size = len(vocab.read_text("utf-8").splitlines())
    config = AntConfig.from_dict({**preset("tiny").to_dict(), "vocab_size": size, "num_layers": 2, "max_length": 256})
    model_dir = save_checkpoint(build_model(config, seed=0), config, root / "model", vocab=vocab)
    return model_dir, data


def recipe(data: Path, **extra) -> CompressRecipe:
    values = {"data": str(data), "seq_length": 96, "batch_size": 2, "save_every": 3, "progress": False,
              "calibration_rows": 4,
              "steps": [{"prune": {"target": 0.4, "steps": 40, "target_warmup_steps": 10, "mask_lr": 0.3,
                                   "lagrangian_lr": 0.5, "distill": {"temperature": 2.0, "alpha": 0.5}}},
                        {"distill": {"steps": 4, "lr": 1e-3}},
                        {"quantize": {"bits": 4, "group_size": 16, "method": "gptq"}}], **extra}
    return CompressRecipe.from_dict(values)
