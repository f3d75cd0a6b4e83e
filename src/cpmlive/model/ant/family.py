"""CPM-Ant's entry in the registry."""

from cpmlive.model.ant import convert
from cpmlive.model.ant.config import PRESET_ALIASES, PRESETS, AntConfig
from cpmlive.model.ant.model import CpmAnt, build_model
from cpmlive.model.registry import Family, Presets
from cpmlive.resources import DEMO
from cpmlive.tokenizer import AntTokenizer

FAMILY = Family(
    model_type="cpm-ant", name="CPM-Ant",
    abilities=frozenset({"generate", "chat", "fill", "title", "classify", "align", "calibrate", "prune", "moefy",
                         "retrain", "prompt"}),
    config=AntConfig, model=CpmAnt, tokenizer=AntTokenizer, presets=Presets(PRESETS, PRESET_ALIASES),
    build=build_model, load=convert.load_pretrained, convert=convert.convert, info=convert.checkpoint_info,
    resolve=convert.resolve, aliases=("cpmant",), vocab_example="cpm-ant-vocab.txt", demo=DEMO,
    signature_keys=("segment_embedding.weight", "cpmant.segment_embedding.weight"),
    pretrain_objective="infill-generate", packs_head=True,
)
