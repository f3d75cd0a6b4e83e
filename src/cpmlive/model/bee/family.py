"""CPM-Bee's entry in the registry."""

from cpmlive.model.bee import convert
from cpmlive.model.bee.config import PRESETS, BeeConfig
from cpmlive.model.bee.model import CpmBee, build_bee
from cpmlive.model.registry import Family
from cpmlive.resources import BEE_DEMO
from cpmlive.tokenizer.bee import BeeTokenizer

FAMILY = Family(
    model_type="cpm-bee", name="CPM-Bee", abilities=frozenset({"bee", "generate", "chat", "calibrate", "align"}),
    hint="a CPM-Bee model answers JSON tasks (lm.bee, `cpmlive bee`, /v1/bee) and, through its text and dialogue "
         "tasks, generate and chat",
    config=BeeConfig, model=CpmBee, tokenizer=BeeTokenizer, presets=PRESETS, build=build_bee,
    load=convert.load_pretrained, convert=convert.convert, info=convert.checkpoint_info, resolve=convert.resolve,
    aliases=("cpmbee",), vocab_example="CPM-Bee vocab.txt", demo=BEE_DEMO, claims=convert.is_bee_checkpoint,
)
