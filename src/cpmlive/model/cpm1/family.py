"""CPM-1's entry in the registry."""

from cpmlive.model.cpm1 import convert
from cpmlive.model.cpm1.config import PRESETS, Cpm1Config
from cpmlive.model.cpm1.model import Cpm1, build_cpm1
from cpmlive.model.registry import Family
from cpmlive.resources import CPM1_DEMO
from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

FAMILY = Family(
    model_type="cpm1", name="CPM-1", abilities=frozenset({"generate", "chat", "title", "classify", "retrain"}),
    hint="CPM-1 is a left-to-right model: use generate", config=Cpm1Config, model=Cpm1, tokenizer=Cpm1Tokenizer,
    presets=PRESETS, build=build_cpm1, load=convert.load_pretrained, convert=convert.convert,
    info=convert.checkpoint_info, resolve=convert.resolve, aliases=("gpt2",), vocab_name=Cpm1Tokenizer.vocab_file,
    demo=CPM1_DEMO, claims=convert.is_cpm1_checkpoint,
    signature_keys=("position_embedding.weight", "transformer.wte.weight", "word_embeddings.weight"),
    weights_name="CPM-1 (GPT-2)",
    pretrain_objective="causal",
)
