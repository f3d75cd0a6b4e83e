"""CPM-Bee's JSON tasks as token arrays (spec section 7.4).

An input is a JSON object of strings (nested objects allowed). It becomes a tree: ``<root>``,
then every key as a node and every string value as a leaf one level below its key, numbered in
depth-first pre-order; each node is one *segment* ``<s> tokens </s>``. The leaves under the
top-level key ``<ans>`` are the answers: they carry no ``</s>`` and are not context. How two
segments relate (steps up to their common ancestor, steps down from it) is a small table,
``segment_rel``, that the model's position bias reads.

Generation replaces every ``<ans>`` leaf with a placeholder ``<ans_k>``, drops the answers'
tokens from the prompt and decodes each answer in turn (``infer.bee``). Training rows are
several examples packed end to end, each with its own span (``pack``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from cpmlive.data.align import json_lines
from cpmlive.data.bee_json import ANSWER_KEY, MAX_DEPTH, check_example, check_task, parse_task
from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.bee import BeeTokenizer, escape

class Shuffler(Protocol):
    """``random.Random`` or ``numpy.random.RandomState`` (the original shuffles with numpy)."""

    def shuffle(self, x: list) -> None: ...


IGNORE = -100


# ---- the token tree ---------------------------------------------------------------------------


@dataclass
class Node:
    value: str
    depth: int
    segment: int
    predict: bool
    children: list["Node"] = field(default_factory=list)


@dataclass
class TreeArrays:
    """``convert_data_to_id``'s output for one example: per-token ids and sub indices, context
    flags and segment ids, the ``num_segments**2`` relation table, and the ext tables (temporary
    id -> text, and per base name: temporary id -> sub index)."""

    ids: list[int]
    subs: list[int]
    context: list[int]
    segments: list[int]
    segment_rel: Tensor
    num_segments: int
    ext_table: dict[int, str]
    token_id_table: dict[str, dict[int, int]]


def _build_tree(data: Any, depth: int, predict: bool, nodes: list[Node], shuffle: Shuffler | None) -> list[Node]:
    if not isinstance(data, dict):
        leaf = Node(data, depth, len(nodes), predict)
        nodes.append(leaf)
        return [leaf]
    items = list(data.items())
    if predict and shuffle is not None:
        order = list(range(len(items)))
        shuffle.shuffle(order)
        items = [items[i] for i in order]
    out = []
    for key, value in items:
        node = Node(key, depth, len(nodes), False)
        nodes.append(node)
        node.children = _build_tree(value, depth + 1, predict or (depth == 1 and key == ANSWER_KEY), nodes, shuffle)
        out.append(node)
    return out


def segment_relations(nodes: list[Node]) -> Tensor:
    """The ``len(nodes)**2`` relation table, row-major (int32): entry ``(a, b)`` is
    ``up * MAX_DEPTH + down`` for the steps from segment ``a`` up to the deepest common ancestor
    of ``a`` and ``b`` and down to ``b`` (each clipped to ``MAX_DEPTH - 1``), plus one when not 0
    (bucket 1 means "another sample").

    The table is the model's input and has a square's size, but the Python work is linear: in
    pre-order every subtree is a run of segments, so the common ancestor's depth is one square
    block per node (deeper nodes overwrite), and the buckets are whole-table tensor operations
    (a pair-by-pair loop grew with the square of the segments in Python steps)."""
    count = len(nodes)
    ends = [node.segment + 1 for node in nodes]
    for node in reversed(nodes):
        for child in node.children:
            ends[node.segment] = max(ends[node.segment], ends[child.segment])
    common = torch.zeros(count, count, dtype=torch.int8)
    for node in nodes:
        if ends[node.segment] - node.segment > 1:
            common[node.segment:ends[node.segment], node.segment:ends[node.segment]] = node.depth
    common.diagonal().copy_(torch.tensor([node.depth for node in nodes], dtype=torch.int8))
    depth = torch.tensor([node.depth for node in nodes], dtype=torch.int8)
    table = (depth[:, None] - common).clamp_(max=MAX_DEPTH - 1).int().mul_(MAX_DEPTH)
    table += (depth[None, :] - common).clamp_(max=MAX_DEPTH - 1)
    table += table > 0
    return table.view(-1)


def base_name(token: str) -> str:
    """``<mask_0>`` -> ``<mask>``; an unknown run of characters -> ``<unk>``."""
    if token.startswith("<") and token.endswith(">"):
        return f"<{token[1:-1].split('_', 1)[0]}>"
    return "<unk>"


def tree_arrays(tokenizer: BeeTokenizer, data: dict, shuffle: Shuffler | None = None,
                ext_table: dict[int, str] | None = None,
                token_id_table: dict[str, dict[int, int]] | None = None) -> TreeArrays:
    """Token arrays of one task object (``shuffle``: permute the items of objects inside
    ``<ans>``, as training does). The ext tables may continue an earlier example's."""
    root = Node("<root>", 0, 0, False)
    nodes = [root]
    root.children = _build_tree(data, 1, False, nodes, shuffle)
    table = dict(ext_table or {})
    ids_of = {text: token_id for token_id, text in table.items()}
    subs_of = {name: dict(mapping) for name, mapping in (token_id_table or {}).items()}
    ids, subs, context, segments = [], [], [], []
    for node in nodes:
        raw = tokenizer.encode_into(node.value, table, ids_of)
        node_ids, node_subs = [tokenizer.bos_id], [0]
        for token_id in raw:
            if token_id not in table:
                node_ids.append(token_id)
                node_subs.append(0)
                continue
            name = base_name(table[token_id])
            if name not in tokenizer.encoder:
                raise CpmliveError(f"unknown special token {table[token_id]!r} (known kinds: "
                                   "<mask_k>, <ans_k>, <option_k> and the vocabulary's <...> tokens)")
            mapping = subs_of.setdefault(name, {})
            mapping.setdefault(token_id, len(mapping))
            node_ids.append(tokenizer.encoder[name])
            node_subs.append(mapping[token_id])
        if not node.predict:
            node_ids.append(tokenizer.eos_id)
            node_subs.append(0)
        ids += node_ids
        subs += node_subs
        context += [0 if node.predict else 1] * len(node_ids)
        segments += [node.segment] * len(node_ids)
    return TreeArrays(ids, subs, context, segments, segment_relations(nodes), len(nodes), table, subs_of)


# ---- generation inputs --------------------------------------------------------------------------


@dataclass
class Prompt:
    """One task prepared for decoding: the prompt's arrays (answers removed), the segment and
    answer number of each ``<ans>`` leaf in decoding order, where each answer goes in the
    object, and the row's own extra tokens as ``(base id, sub) -> text``."""

    data: dict
    ids: list[int]
    subs: list[int]
    segments: list[int]
    segment_rel: Tensor
    num_segments: int
    answers: list[tuple[int, int]]
    paths: list[list[str]]
    extras: dict[tuple[int, int], str]
    # With in-context examples, per token: its sample (0 the task, k the k-th example), where its
    # sample's relation table starts in ``segment_rel``, and its sample's segment count.
    sample_ids: list[int] = field(default_factory=list)
    rel_offsets: list[int] = field(default_factory=list)
    segment_counts: list[int] = field(default_factory=list)


def _placeholders(value: Any, path: list[str], paths: list[list[str]]) -> Any:
    if isinstance(value, dict):
        return {key: _placeholders(child, path + [key], paths) for key, child in value.items()}
    paths.append(path)
    return f"<ans_{len(paths)}>"


def prompt_for(tokenizer: BeeTokenizer, data: dict, examples: Sequence[dict] = ()) -> Prompt:
    """Decoding inputs of one task, as the original's ``_convert_to_tensors`` builds them, with
    its in-context ``examples`` (filled tasks) after it as the original's pretraining packs them:
    example ``k`` is sample ``k``, all context, its answers without ``</s>``, its segments counted
    from its own root, its relation table appended (``segment_rel_offset``), the ext tables carried
    on; positions run on over the whole row. The task's tokens see the examples; an example sees
    only itself (the model's sample mask)."""
    check_task(data)
    paths: list[list[str]] = []
    marked = dict(data)
    marked[ANSWER_KEY] = _placeholders(data[ANSWER_KEY], [], paths)
    tree = tree_arrays(tokenizer, marked)
    answer_of_sub = {sub: int(tree.ext_table[fake][5:-1])
                     for fake, sub in tree.token_id_table.get(ANSWER_KEY, {}).items()
                     if tree.ext_table[fake].startswith("<ans_")}
    answer_id = tokenizer.encoder[ANSWER_KEY]
    ids, subs, segments, answers = [], [], [], []
    for token, sub, ctx, segment in zip(tree.ids, tree.subs, tree.context, tree.segments):
        if ctx:
            ids.append(token)
            subs.append(sub)
            segments.append(segment)
        elif token == answer_id:
            answers.append((segment, answer_of_sub[sub]))
    if not answers:
        raise CpmliveError("no answer to predict: the <ans> field holds an empty object")
    table, subs_of, relations = tree.ext_table, tree.token_id_table, [tree.segment_rel]
    samples = [0] * len(ids), [0] * len(ids), [tree.num_segments] * len(ids)
    for number, example in enumerate(examples, 1):
        check_example(example, f"example {number}")
        shown = tree_arrays(tokenizer, example, ext_table=table, token_id_table=subs_of)
        table, subs_of = shown.ext_table, shown.token_id_table
        ids, subs, segments = ids + shown.ids, subs + shown.subs, segments + shown.segments
        for column, value in zip(samples, (number, sum(map(len, relations)), shown.num_segments)):
            column += [value] * len(shown.ids)
        relations.append(shown.segment_rel)
    extras = {}
    for name, mapping in subs_of.items():
        if name == ANSWER_KEY:
            continue
        for fake, sub in mapping.items():
            extras[(tokenizer.encoder[name], sub)] = table[fake]
    sample_ids, offsets, counts = samples if examples else ([], [], [])
    return Prompt(data, ids, subs, segments, torch.cat(relations), tree.num_segments, answers, paths, extras,
                  sample_ids, offsets, counts)


# ---- decoding answers ------------------------------------------------------------------------------

BARRED = -10000.0  # what the original writes into barred columns (not -inf: log_softmax stays finite)


@dataclass
class Beam:
    """One live hypothesis: which answer it is in, its tokens as ``(output column, answer
    number)``, and what it feeds next."""

    answer: int = 0
    tokens: list[tuple[int, int]] = field(default_factory=list)
    feed: int = 0
    feed_sub: int = 0
    segment: int = 0
    position: int = 0


def barred_columns(batch: PromptBatch, rows_per_task: int, unk_id: int, vocab_size: int) -> Tensor:
    """Per decoding row, the columns it may not choose: ``<unk>`` (unless its task has an unknown
    piece) and other tasks' extra columns. Made once per batch, applied each step as one
    ``masked_fill`` (a loop over every extra column each step grew with the task's unknown pieces)."""
    barred = torch.zeros(len(batch.row_tables), vocab_size + len(batch.ext_ids), dtype=torch.bool)
    barred[:, vocab_size:] = True
    for task, table in enumerate(batch.row_tables):
        barred[task, unk_id] = unk_id not in table
        barred[task, [column for column in table if column >= vocab_size]] = False
    return barred.repeat_interleave(rows_per_task, dim=0).to(batch.ext_ids.device)


def advanced(beam: Beam, column: int, prompt: Prompt, batch: PromptBatch, eos_id: int, bos_id: int,
              vocab_size: int) -> Beam:
    number = prompt.answers[beam.answer][1]
    tokens = beam.tokens + [(column, number)]
    if column == eos_id:
        segment = prompt.answers[beam.answer + 1][0]
        return Beam(beam.answer + 1, tokens, bos_id, 0, segment, 0)
    feed, sub = column, 0
    if column >= vocab_size:
        index = column - vocab_size
        feed, sub = int(batch.ext_ids[index]), int(batch.ext_subs[index])
    return Beam(beam.answer, tokens, feed, sub, beam.segment, beam.position + 1)


def answer_texts(tokens: list[tuple[int, int]], table: dict[int, str], tokenizer: BeeTokenizer) -> dict[int, str]:
    """Answer number -> text (a trailing ``</s>`` dropped), ordinary ``<`` escaped as in inputs."""
    by_answer: dict[int, list[int]] = {}
    for column, number in tokens:
        by_answer.setdefault(number, []).append(column)
    texts = {}
    for number, columns in by_answer.items():
        if columns and columns[-1] == tokenizer.eos_id:
            columns = columns[:-1]
        texts[number] = tokenizer.decode(columns, table)
    return texts


@dataclass
class PromptBatch:
    """Left-padded prompt rows and the batch's ext table (``(base id, sub)`` pairs with sub > 0,
    one output column each after the vocabulary), with each row's column -> text map."""

    inputs: dict[str, Tensor]
    ext_ids: Tensor
    ext_subs: Tensor
    row_tables: list[dict[int, str]]


def batch_prompts(prompts: list[Prompt], vocab_size: int, device: torch.device | str = "cpu") -> PromptBatch:
    width = max(len(p.ids) for p in prompts)
    rel_width = max(len(p.segment_rel) for p in prompts)
    columns: dict[tuple[int, int], int] = {}
    row_tables = []
    for prompt in prompts:
        table = {}
        for (base, sub), text in prompt.extras.items():
            if sub == 0:
                table[base] = text
                continue
            column = columns.setdefault((base, sub), vocab_size + len(columns))
            table[column] = text
        row_tables.append(table)

    def padded(values: list[int], length: int) -> list[int]:
        return [0] * (length - len(values)) + values

    def tensor(rows: list[list[int]]) -> Tensor:
        return torch.tensor(rows, dtype=torch.int32, device=device)

    inputs = {
        "input_ids": tensor([padded(p.ids, width) for p in prompts]),
        "input_sub": tensor([padded(p.subs, width) for p in prompts]),
        "position": tensor([padded(list(range(len(p.ids))), width) for p in prompts]),
        "segment": tensor([padded(p.segments, width) for p in prompts]),
        "num_segments": tensor([padded(p.segment_counts or [p.num_segments] * len(p.ids), width) for p in prompts]),
        "segment_rel": torch.stack([torch.nn.functional.pad(p.segment_rel, (0, rel_width - len(p.segment_rel)))
                                    for p in prompts]).to(device),
    }
    batch = len(prompts)
    inputs["context"] = inputs["num_segments"] != 0
    inputs["valid"] = inputs["context"].clone()
    inputs["sample_ids"] = tensor([padded(p.sample_ids or [0] * len(p.ids), width) for p in prompts])
    inputs["segment_rel_offset"] = tensor([padded(p.rel_offsets or [0] * len(p.ids), width) for p in prompts])
    inputs["span"] = torch.zeros(batch, width, dtype=torch.int32, device=device)
    pairs = sorted(columns.items(), key=lambda item: item[1])
    ext_ids = torch.tensor([base for (base, _), _ in pairs] or [0], dtype=torch.int32, device=device)
    ext_subs = torch.tensor([sub for (_, sub), _ in pairs] or [1], dtype=torch.int32, device=device)
    if not pairs:
        ext_ids, ext_subs = ext_ids[:0], ext_subs[:0]
    return PromptBatch(inputs, ext_ids, ext_subs, row_tables)


def filled(prompt: Prompt, answers: dict[int, str]) -> dict:
    """The task object with answer ``k`` (1-based) at its place; unanswered leaves are null."""
    data = copy.deepcopy(prompt.data)
    for number, path in enumerate(prompt.paths, 1):
        text = answers.get(number)
        if not path:
            data[ANSWER_KEY] = text
            continue
        node = data[ANSWER_KEY]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = text
    return data


# ---- training rows ---------------------------------------------------------------------------------


@dataclass
class Example:
    """One training example: its tree arrays and, per token, the target: a vocabulary id, an
    extra token's ``(base id, sub)`` (packing gives it a batch column), or -100 for none."""

    tree: TreeArrays
    targets: list[int | tuple[int, int]]

    def __len__(self) -> int:
        return len(self.tree.ids)


def training_example(tokenizer: BeeTokenizer, data: dict, shuffle: Shuffler | None = None) -> Example:
    """Arrays and next-token targets of one filled-in task (answers present, as training reads
    them): a non-context token's target is the next token, or ``</s>`` where the next token
    starts another segment (or the example ends)."""
    check_task(data)
    tree = tree_arrays(tokenizer, data, shuffle)
    targets: list[int | tuple[int, int]] = [IGNORE] * len(tree.ids)
    for position in range(len(tree.ids)):
        if tree.context[position]:
            continue
        following = position + 1
        if following == len(tree.ids) or tree.segments[following] != tree.segments[position]:
            targets[position] = tokenizer.eos_id
        elif tree.subs[following] > 0:
            targets[position] = (tree.ids[following], tree.subs[following])
        else:
            targets[position] = tree.ids[following]
    return Example(tree, targets)


def pack(examples: list[Example], length: int, vocab_size: int,
         device: torch.device | str = "cpu", in_order: bool = False) -> dict[str, Tensor]:
    """Examples best-fit into rows of ``length`` positions (each its own span), as one batch
    with a shared ext table; returns the model's inputs plus ``target`` and ``ext_ids``/``ext_subs``.
    ``in_order``: one example a row, row ``i`` example ``i`` (scores per example)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in examples if in_order else sorted(examples, key=len, reverse=True):
        if len(example) > length:
            raise CpmliveError(f"an example of {len(example)} tokens does not fit rows of {length}")
        fits = [] if in_order else [i for i, free in enumerate(room) if free >= len(example)]
        if fits:
            best = min(fits, key=lambda i: room[i])
            rows[best].append(example)
            room[best] -= len(example)
        else:
            rows.append([example])
            room.append(length - len(example))
    columns: dict[tuple[int, int], int] = {}
    names = ("input_ids", "input_sub", "context", "sample_ids", "num_segments", "segment",
             "segment_rel_offset", "span", "target", "valid", "position")
    out = {name: torch.zeros(len(rows), length, dtype=torch.int32) for name in names}
    out["target"].fill_(IGNORE)
    rel_rows = []
    for r, row in enumerate(rows):
        start, rel, rel_length = 0, [], 0
        for span, example in enumerate(row):
            tree, end = example.tree, start + len(example)
            view = slice(start, end)
            out["input_ids"][r, view] = torch.tensor(tree.ids)
            out["input_sub"][r, view] = torch.tensor(tree.subs)
            out["context"][r, view] = torch.tensor(tree.context)
            out["segment"][r, view] = torch.tensor(tree.segments)
            out["num_segments"][r, view] = tree.num_segments
            out["segment_rel_offset"][r, view] = rel_length
            out["span"][r, view] = span
            out["valid"][r, view] = 1
            for pair in zip(tree.ids, tree.subs):
                if pair[1] > 0:
                    columns.setdefault(pair, len(columns))
            targets = [vocab_size + columns[t] if isinstance(t, tuple) else t
                       for t in example.targets]
            out["target"][r, view] = torch.tensor(targets)
            rel.append(tree.segment_rel)
            rel_length += len(tree.segment_rel)
            start = end
        out["position"][r] = torch.arange(length)
        rel_rows.append(torch.cat(rel))
    width = max(len(rel) for rel in rel_rows)
    out["segment_rel"] = torch.stack([torch.nn.functional.pad(rel, (0, width - len(rel))) for rel in rel_rows])
    out["context"] = out["context"].bool()
    out["valid"] = out["valid"].bool()
    pairs = sorted(columns.items(), key=lambda item: item[1])
    out["ext_ids"] = torch.tensor([base for (base, _), _ in pairs], dtype=torch.int32)
    out["ext_subs"] = torch.tensor([sub for (_, sub), _ in pairs], dtype=torch.int32)
    return {name: tensor.to(device) for name, tensor in out.items()}


MODEL_INPUTS = ("input_ids", "input_sub", "context", "segment", "segment_rel", "num_segments", "valid", "span",
                "sample_ids", "segment_rel_offset", "position")  # what of a packed batch the model reads


@dataclass
class PackedBatch:
    """Packed rows (:func:`pack`) as a batch to run the model on: ``valid`` marks the positions
    that hold tokens (what calibration reads), ``as_inputs()`` the model's keyword inputs."""

    tensors: dict[str, Tensor]

    @property
    def valid(self) -> Tensor:
        return self.tensors["valid"]

    def as_inputs(self) -> dict[str, Tensor]:
        return {name: self.tensors[name] for name in MODEL_INPUTS}


def text_batches(tokenizer: BeeTokenizer, lines: Sequence[str], rows: int, length: int,
                 batch_rows: int = 8) -> list[PackedBatch]:
    """At most ``rows`` rows of ``length`` positions of text, each line the answer of
    ``{"<ans>": line}`` (what the bilingual demo pretrains on; a line too long is cut to fit),
    best-fit packed, in batches of ``batch_rows``: the text GPTQ and AWQ fit a CPM-Bee model's
    codes to."""
    examples = []
    for line in lines:
        example = training_example(tokenizer, {ANSWER_KEY: escape(line)})
        while len(example) > length and len(line) > 1:
            line = line[:max(1, len(line) * length // len(example) - 1)]
            example = training_example(tokenizer, {ANSWER_KEY: escape(line)})
        if len(example) <= length:
            examples.append(example)
    if not examples:
        raise CpmliveError("the calibration text has no line that fits a row")
    packed = pack(examples, length, tokenizer.vocab_size)
    kept = {name: tensor[:rows] if tensor.dim() == 2 else tensor for name, tensor in packed.items()}
    count = kept["valid"].size(0)
    return [PackedBatch({name: tensor[start:start + batch_rows] if tensor.dim() == 2 else tensor
                         for name, tensor in kept.items()}) for start in range(0, count, batch_rows)]


def tuning_tasks(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, task)`` per line of a JSONL file of filled tasks (supervised fine-tuning, as
    ``finetune`` reads them)."""
    tasks = [(where, check_example(obj, where)) for where, obj in json_lines(path)]
    if not tasks:
        raise CpmliveError(f"{path}: no tasks")
    return tasks


def _question(task: dict) -> dict:
    return {key: value for key, value in task.items() if key != ANSWER_KEY}


def preference_tasks(path: str | Path) -> list[tuple[str, dict, dict]]:
    """``(where, chosen, rejected)`` per line ``{"chosen": task, "rejected": task}``: two fillings
    of one task (the same object but for ``<ans>``) that differ."""
    pairs = []
    for where, obj in json_lines(path):
        if set(obj) != {"chosen", "rejected"}:
            raise CpmliveError(f"{where}: a CPM-Bee preference pair is {{\"chosen\": task, \"rejected\": task}}")
        chosen, rejected = (check_example(obj[name], f"{where}: {name}") for name in ("chosen", "rejected"))
        if _question(chosen) != _question(rejected):
            raise CpmliveError(f"{where}: chosen and rejected fill different tasks (only <ans> may differ)")
        if chosen[ANSWER_KEY] == rejected[ANSWER_KEY]:
            raise CpmliveError(f"{where}: chosen and rejected give the same answer; the pair teaches nothing")
        pairs.append((where, chosen, rejected))
    if not pairs:
        raise CpmliveError(f"{path}: no pairs")
    return pairs


def answers_of(data: dict) -> Iterator[tuple[list[str], str]]:
    """Every answer leaf of a filled task with its path inside ``<ans>``."""
    def walk(value: Any, path: list[str]) -> Iterator[tuple[list[str], str]]:
        if isinstance(value, dict):
            for key, child in value.items():
                yield from walk(child, path + [key])
        else:
            yield path, value
    yield from walk(data[ANSWER_KEY], [])


def blank_answers(data: dict) -> dict:
    """The task with every answer emptied (the form generation takes)."""
    out = dict(data)

    def empty(value: Any) -> Any:
        return {key: empty(child) for key, child in value.items()} if isinstance(value, dict) else ""
    out[ANSWER_KEY] = empty(data[ANSWER_KEY])
    return out


__all__ = ["ANSWER_KEY", "Example", "MAX_DEPTH", "MODEL_INPUTS", "PackedBatch", "Prompt", "PromptBatch", "TreeArrays",
           "BARRED", "Beam", "advanced", "answer_texts", "barred_columns",
           "batch_prompts", "preference_tasks", "text_batches", "tuning_tasks",
           "blank_answers", "check_example", "check_task", "filled", "pack", "parse_task", "prompt_for",
           "training_example", "tree_arrays"]
