"""CPM-Bee against the original OpenBMB code: the tokenizer, the JSON -> token-tree conversion,
training rows, the model's logits, cached decoding, and greedy and beam-3 generation
(``../shared/fixtures/reference/bee-*``, tiny random weights, float32)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpmlive.model.bee.config import PRESETS as BEE_PRESETS, BeeConfig
from cpmlive.api import LM
from cpmlive.data import bee as tasks
from cpmlive.errors import CpmliveError
from cpmlive.infer.bee import fill_tasks
from cpmlive.infer.generate import GenerationConfig
from cpmlive.model.bee.model import CpmBee
from cpmlive.model.openbmb import openbmb_to_ours
from cpmlive.tokenizer.bee import BeeTokenizer
from cpmlive.train.bee import batch_loss

from conftest import FIXTURES, REFERENCE

BEE = REFERENCE / "bee-tiny"
VOCAB = FIXTURES / "cpm-bee-vocab.txt"
TASKS = ("textgen", "translate", "rating", "choice", "fill")
FILL_SEED = 104  # cases.json: np.random.seed(104) before the 'fill' example was added


@pytest.fixture(scope="module")
def tokenizer() -> BeeTokenizer:
    return BeeTokenizer.from_file(VOCAB)


@pytest.fixture(scope="module")
def cases() -> tuple[dict, dict]:
    return json.loads((BEE / "cases.json").read_text(encoding="utf-8")), load_file(BEE / "cases.safetensors")


@pytest.fixture(scope="module")
def model() -> CpmBee:
    config = BeeConfig.load(BEE / "config.json")
    bee = CpmBee(config)
    bee.load_state_dict(openbmb_to_ours(load_file(BEE / "model.safetensors"), config))
    return bee.eval()


# ---- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_equals_the_original(tokenizer):
    entries = json.loads((REFERENCE / "bee-tokenizer.json").read_text(encoding="utf-8"))["entries"]
    assert len(entries) == 30
    for entry in entries:
        if "error" in entry:
            with pytest.raises(CpmliveError):
                tokenizer.tokenize(entry["text"])
            continue
        pieces = [(p.token, p.start, p.is_unk, p.is_special) for p in tokenizer.tokenize(entry["text"])]
        assert pieces == [(t["token"], t["start"], t["is_unk"], t["is_special"])
                          for t in entry["tokens"]], entry["text"]
        ids, ext = tokenizer.encode(entry["text"])
        assert ids == entry["ids"], entry["text"]
        assert {str(k): v for k, v in ext.items()} == entry["ext_table"]
        assert tokenizer.decode(ids, ext) == entry["decoded"]


def test_tokenizer_vocabulary_and_specials(tokenizer):
    assert tokenizer.vocab_size == 86583
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 6, 7)
    assert tokenizer.encode("\n \n")[0] == [4, 5, 4]
    ids, ext = tokenizer.encode("<mask_0>😀<mask_0>")
    assert ids == [86583, 86584, 86583] and ext == {86583: "<mask_0>", 86584: "😀"}


# ---- JSON -> arrays -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASKS)
def test_tree_arrays_equal_convert_data_to_id(tokenizer, cases, name):
    task = cases[0]["tasks"][name]
    expected = task["convert_data_to_id"]
    shuffle = np.random.RandomState(FILL_SEED) if name == "fill" else None
    arrays = tasks.tree_arrays(tokenizer, task["json_for_forward"], shuffle=shuffle)
    assert arrays.ids == expected["ids"]
    assert arrays.subs == expected["id_subs"]
    assert arrays.context == expected["context"]
    assert arrays.segments == expected["segment_ids"]
    assert arrays.segment_rel.tolist() == expected["segment_rel"]
    assert arrays.num_segments == expected["num_segments"]
    assert {str(k): v for k, v in arrays.ext_table.items()} == expected["ext_table"]
    assert ({k: {str(i): j for i, j in m.items()} for k, m in arrays.token_id_table.items()}
            == expected["token_id_table"])
    if name == "fill":
        assert tasks.tree_arrays(tokenizer, task["json_for_forward"]).ids == expected["unshuffled_ids"]


@pytest.mark.parametrize("name", TASKS)
def test_training_row_equals_the_packer(tokenizer, cases, name):
    task, tensors = cases[0]["tasks"][name], cases[1]
    shuffle = np.random.RandomState(FILL_SEED) if name == "fill" else None
    example = tasks.training_example(tokenizer, task["json_for_forward"], shuffle=shuffle)
    row = tasks.pack([example], len(example) + 3, tokenizer.vocab_size)
    for ours, theirs in [("input_ids", "input"), ("input_sub", "input_sub"), ("context", "context"),
                         ("segment", "segment"), ("num_segments", "num_segments"), ("span", "span"),
                         ("segment_rel", "segment_rel"), ("target", "target")]:
        assert torch.equal(row[ours].int(), tensors[f"{name}.{theirs}"].int()), ours


# ---- the model ----------------------------------------------------------------------------------


def _forward_case(model, tensors, name):
    get = lambda field: tensors[f"{name}.{field}"]  # noqa: E731
    valid = torch.arange(get("input").size(1))[None, :] < get("length")[:, None]
    with torch.no_grad():
        hidden = model(get("input"), get("input_sub"), get("context"), get("segment"), get("segment_rel"),
                       get("num_segments"), valid, span=get("span"), sample_ids=get("sample_ids"),
                       segment_rel_offset=get("segment_rel_offset"))
        logits = model.logits(hidden, get("ext_table_ids"), get("ext_table_sub"))
    return get, valid, hidden, logits


@pytest.mark.parametrize("name", TASKS + ("packed",))
def test_logits_equal_the_reference(model, cases, name):
    get, valid, hidden, logits = _forward_case(model, cases[1], name)
    columns = get("logit_columns").long()
    assert (hidden - get("hidden"))[valid].abs().max() <= 1e-4
    assert (logits[..., columns] - get("logits_cols"))[valid].abs().max() <= 1e-4
    assert (logits.double().logsumexp(-1).float() - get("logsumexp"))[valid].abs().max() <= 1e-4
    assert (logits.amax(-1) - get("max"))[valid].abs().max() <= 1e-4
    assert torch.equal(logits.argmax(-1)[valid], get("argmax")[valid].long())
    target = get("target").long()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), ignore_index=-100)
    assert abs(loss.item() - get("loss").item()) <= 1e-4


def test_training_loss_of_our_rows_equals_the_reference(model, tokenizer, cases):
    """Our packer's row through our loss (answer positions only) gives the original's loss;
    the packer's placeholder extra column (id 0, sub 1) is kept for the comparison."""
    task = cases[0]["tasks"]["translate"]
    example = tasks.training_example(tokenizer, task["json_for_forward"])
    batch = tasks.pack([example], len(example) + 3, tokenizer.vocab_size)
    batch["ext_ids"], batch["ext_subs"] = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    with torch.no_grad():
        loss, count = batch_loss(model, batch)
    assert count == int((cases[1]["translate.target"] != -100).sum())
    assert abs(loss.item() - cases[1]["translate.loss"].item()) <= 1e-4


# ---- generation ----------------------------------------------------------------------------------


def _generation(cases, tokenizer):
    rows = cases[0]["cases"]["generate"]["rows"]
    objects = [cases[0]["tasks"][row["task"]]["json_for_generation"] for row in rows]
    return rows, objects, tasks.batch_prompts([tasks.prompt_for(tokenizer, o) for o in objects], tokenizer.vocab_size)


def test_generation_inputs_equal_the_original(tokenizer, cases):
    rows, _, batch = _generation(cases, tokenizer)
    tensors = cases[1]
    for ours, theirs in [("input_ids", "input"), ("input_sub", "input_sub"), ("position", "position"),
                         ("segment", "segment"), ("num_segments", "num_segments"), ("segment_rel", "segment_rel")]:
        assert torch.equal(batch.inputs[ours], tensors[f"generate.{theirs}"]), ours
    assert torch.equal(batch.ext_ids, tensors["generate.ext_table_ids"])
    assert torch.equal(batch.ext_subs, tensors["generate.ext_table_sub"])
    assert [{str(k): v for k, v in t.items()} for t in batch.row_tables] == [r["ext_table_for_decoding"] for r in rows]


def test_cached_decoding_equals_the_reference_and_the_full_forward(model, tokenizer, cases):
    """The prefill and 8 cached one-token steps of the reference's greedy run, each step's
    logits against the original's, and the last step against one uncached forward of the
    whole sequence in the training layout (the decoded answer as non-context tokens, which see
    the prompt and the answer up to themselves, as each cached step did)."""
    _, _, batch = _generation(cases, tokenizer)
    tensors = cases[1]
    get = lambda field: tensors[f"generate.{field}"]  # noqa: E731
    columns = get("logit_columns").long()
    inputs = batch.inputs
    cache = model.new_cache(5, inputs["input_ids"].size(1) + 8)
    with torch.no_grad():
        hidden = model(**inputs, cache=cache)
        valid = inputs["valid"]
        assert (hidden - get("hidden"))[valid].abs().max() <= 1e-4
        logits = model.logits(hidden, batch.ext_ids, batch.ext_subs)
        assert (logits[..., columns] - get("logits_cols"))[valid].abs().max() <= 1e-4
        ones = torch.ones(5, 1, dtype=torch.bool)
        for step in range(8):
            column = lambda name: get(name)[step][:, None]  # noqa: E731
            hidden = model(column("step_input"), column("step_input_sub"), ones, column("step_segment"),
                           inputs["segment_rel"], inputs["num_segments"][:, -1:], ones,
                           position=column("step_position"), cache=cache)[:, -1]
            logits = model.logits(hidden, batch.ext_ids, batch.ext_subs)
            assert (hidden - get("step_hidden")[step]).abs().max() <= 1e-4
            assert (logits[:, columns] - get("step_logits_cols")[step]).abs().max() <= 1e-4
            assert torch.equal(logits.argmax(-1), get("step_argmax")[step].long())
        whole = {name: torch.cat([inputs[name], extra], dim=1) for name, extra in [
            ("input_ids", get("step_input").T), ("input_sub", get("step_input_sub").T),
            ("position", get("step_position").T), ("segment", get("step_segment").T),
            ("num_segments", inputs["num_segments"][:, -1:].expand(5, 8)),
            ("context", torch.zeros(5, 8, dtype=torch.bool)), ("valid", torch.ones(5, 8, dtype=torch.bool))]}
        zeros = torch.zeros_like(whole["input_ids"])
        full = model(**whole, segment_rel=inputs["segment_rel"], span=zeros, sample_ids=zeros,
                     segment_rel_offset=zeros)[:, -1]
    assert (full - hidden).abs().max() <= 1e-5


@pytest.mark.parametrize("beams,key", [(1, "greedy"), (3, "beam3")])
def test_generation_equals_the_original(model, tokenizer, cases, beams, key):
    """Greedy (the original's beam 1) and beam 3, token for token, and the filled objects;
    the original's max_length=6 is our max_new_tokens=8."""
    rows, objects, _ = _generation(cases, tokenizer)
    filled, results = fill_tasks(model, tokenizer, objects, GenerationConfig(max_new_tokens=8, num_beams=beams))
    for row, out, result in zip(rows, filled, results):
        assert [list(pair) for pair in result] == row[f"{key}_result_ids"], row["task"]
        assert out == row[f"{key}_filled_json"], row["task"]


def test_the_engines_batch_fills_the_originals_greedy_cases(model, tokenizer, cases):
    """The five cases as requests in the continuous batch (each with its own extra columns)
    filled as the original's beam-1 search fills them."""
    rows, objects, _ = _generation(cases, tokenizer)
    lm = LM(model, tokenizer)
    assert lm.bee(objects, max_new_tokens=8) == [row["greedy_filled_json"] for row in rows]


# ---- presets ------------------------------------------------------------------------------------


def test_presets_match_the_published_configs():
    for name, file in [("bee-10b", "cpm-bee-10b.json"), ("bee-3b", "cpm-bee-3b.json")]:
        published = BeeConfig.load(FIXTURES / file)
        ours = BEE_PRESETS[name]()
        assert {k: v for k, v in ours.to_dict().items() if k in published.to_dict() and k != "max_length"} == \
            {k: v for k, v in published.to_dict().items() if k != "max_length"}
    assert BEE_PRESETS["bee-3b"]().vocab_size == 86580  # three fewer than the vocabulary (spec 7.1)
    with torch.device("meta"):
        sizes = {name: CpmBee(BEE_PRESETS[name]()).num_parameters() / 1e9 for name in ("bee-10b", "bee-3b")}
    # the published "3b" config has 1.82B parameters (dim_ff 3072 is small for dim_model 2560)
    assert 9.5 < sizes["bee-10b"] < 10.5 and 1.7 < sizes["bee-3b"] < 1.9
    # the Hub releases of the compressed sizes: 48 slots, 19 attention and 24 FFN blocks kept,
    # 32 heads of 128 / 64 / 40 (HF config.json), 4.65B / 2.50B / 1.06B parameters
    for name, dim_head, billions in (("bee-5b", 128, 4.65), ("bee-2b", 64, 2.50), ("bee-1b", 40, 1.06)):
        config = BEE_PRESETS[name]()
        assert config.num_layers == 48 and (config.num_heads, config.dim_head) == (32, dim_head)
        assert sum(not a for a, _ in config.mask_modules) == 19 and sum(not f for _, f in config.mask_modules) == 24
        with torch.device("meta"):
            assert round(CpmBee(config).num_parameters() / 1e9, 2) == billions


# ---- the HF release's layout ------------------------------------------------------------------------


def release_directory(path, prefix: str = "cpmbee.", head: bool = True):
    """A directory laid out as OpenBMB's Hub releases are, made by hand from the reference's
    OpenBMB state file: the release's ``config.json`` keys (its shape under HF's names, the
    remote code's ``architectures`` / ``auto_map``), the state dict in ``pytorch_model.bin`` under
    ``CpmBeeForCausalLM``'s prefix with its (tied, unread) ``lm_head``, ``vocab.txt`` and
    ``tokenizer_config.json``."""
    ours = json.loads((BEE / "config.json").read_text())
    config = {"_from_model_config": True, "architectures": ["CpmBeeForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_cpmbee.CpmBeeConfig",
                           "AutoModel": "modeling_cpmbee.CpmBeeForCausalLM",
                           "AutoModelForCausalLM": "modeling_cpmbee.CpmBeeForCausalLM"},
              "vocab_size": ours["vocab_size"], "hidden_size": ours["dim_model"], "dim_ff": ours["dim_ff"],
              "num_hidden_layers": ours["num_layers"], "num_attention_heads": ours["num_heads"],
              "dim_head": ours["dim_head"], "dropout_p": 0.0, "position_bias_num_buckets": 256,
              "position_bias_num_segment_buckets": 256, "position_bias_max_distance": 2048, "eps": 1e-6,
              "half": False, "model_type": "cpmbee"}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    state = {prefix + key: value for key, value in load_file(BEE / "model.safetensors").items()}
    if head:
        state["lm_head.weight"] = state[prefix + "input_embedding.weight"].clone()
    torch.save(state, path / "pytorch_model.bin")
    (path / "vocab.txt").write_bytes(VOCAB.read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CpmBeeTokenizer"}))
    return path


@pytest.mark.parametrize("prefix,head", [("cpmbee.", True), ("", False)])
def test_the_hf_release_layout_reads_as_the_reference(model, tokenizer, cases, tmp_path, prefix, head):
    """With or without the ``cpmbee.`` prefix (the raw release keeps OpenBMB's names), the
    weights and the logits are the reference model's, and the tasks are filled as the original's."""
    from cpmlive.api import load

    lm = load(release_directory(tmp_path / "release", prefix, head))
    assert lm.family.model_type == "cpm-bee" and lm.model.config.to_dict() == model.config.to_dict() | {
        "max_length": lm.model.config.max_length}
    theirs, ours = lm.model.state_dict(), model.state_dict()
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    _, _, batch = _generation(cases, tokenizer)
    with torch.inference_mode():
        hidden = [m(**batch.inputs) for m in (lm.model, model)]
        logits = [m.logits(h, batch.ext_ids, batch.ext_subs) for m, h in zip((lm.model, model), hidden)]
    assert torch.equal(logits[0], logits[1])
    rows, objects, _ = _generation(cases, tokenizer)
    assert lm.bee(objects, max_new_tokens=8) == [row["greedy_filled_json"] for row in rows]


def test_convert_writes_the_release_layout_and_reads_it_back(tmp_path):
    from test_cli import run

    hf, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back.pt"
    result = run("convert", BEE / "model.safetensors", hf, "--to", "hf", "--vocab", VOCAB)
    assert result.returncode == 0, result.stderr.decode()
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["CpmBeeForCausalLM"] and config["model_type"] == "cpmbee"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cpmbee.CpmBeeForCausalLM"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (32, 3, 4)
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_cpmbee.CpmBeeTokenizer"
    assert (hf / "vocab.txt").read_bytes() == VOCAB.read_bytes()
    written = load_file(hf / "model.safetensors")
    original = load_file(BEE / "model.safetensors")
    assert sorted(written) == sorted("cpmbee." + key for key in original)
    assert max((written["cpmbee." + k] - v).abs().max().item() for k, v in original.items()) <= 1e-6
    for step in (("convert", hf, ours), ("convert", ours, back, "--to", "openbmb")):
        assert run(*step).returncode == 0
    again = torch.load(back)
    assert sorted(again) == sorted(original)  # the scales folded in and out again: within float32 rounding
    assert max((again[k] - original[k]).abs().max().item() for k in original) <= 1e-6


def test_an_hf_directory_of_another_architecture_is_a_one_line_error(tmp_path):
    from test_cli import assert_clean_error, run

    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
                                                   "hidden_size": 32}))
    assert_clean_error(run("bee", other, json.dumps({"input": "x", "<ans>": ""})), "'gpt_neox' is not supported")
    wrong = release_directory(tmp_path / "wrong")
    state = torch.load(wrong / "pytorch_model.bin")
    state["cpmbee.encoder.layers.0.self_att.self_attention.query.weight"] = state.pop(
        "cpmbee.encoder.layers.0.self_att.self_attention.project_q.weight")
    torch.save(state, wrong / "pytorch_model.bin")
    assert_clean_error(run("convert", wrong, tmp_path / "out"), "unknown key")
    assert not (tmp_path / "out").exists()
