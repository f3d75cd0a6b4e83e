"""``cpmlive.load(...)``: the one door for Python users, whatever the model's family.

>>> lm = cpmlive.load("demo")
>>> lm.generate("今天天气不错，", max_new_tokens=20)
>>> lm.fill("今天<mask>，我们去公园")

What a model can do is its family's (``cpmlive.model.registry``): ``lm.can(ability)`` tells,
and a method its family cannot do refuses in one line before any work.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from cpmlive.model.registry import ALL_PRESETS, check_model
from cpmlive.data.chat import ChatTemplate, TokenizerChatTemplate
from cpmlive.data.eva_chat import EvaDialogue
from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import Completion, Engine, Request, request_for
from cpmlive.infer.speculative import Assistant
from cpmlive.infer.structured import constraint_from
from cpmlive.data.bee import answer_texts, check_task, filled, parse_task
from cpmlive.data.bee_chat import TEXT_FIELD, BeeDialogue, text_task
from cpmlive.tokenizer.bee import unescape
from cpmlive.infer.bee import Task, fill_tasks, prepare_task
from cpmlive.infer.generate import (GenerationConfig, fill_blanks, generate_ids, hf_generation_defaults, stop_ids_of,
                                    with_defaults)
from cpmlive.infer.score import continuation_logprobs
from cpmlive.infer.vote import Vote, vote
from cpmlive.model.registry import Family, family, family_of, owners, preset_family
from cpmlive.model.runtime.offload import offload_to_device
from cpmlive.model.runtime.streaming import parse_size, stream_weights
from cpmlive.resources import adapter_path
from cpmlive.tune.task import TaskSpec, classify_scores, encode_input
from cpmlive.utils import parse_dtype

MASK = "<mask>"


class LM:
    """A model of any registered family with its family's tokenizer: it generates, streams,
    chats, fills blanks, classifies or answers JSON tasks, as far as its family can
    (:meth:`can`); what the family cannot do is refused in one line."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "") -> None:
        # Fewer tokens than embedding rows is each family's tokenizer's call (Qwen pads its embedding).
        if tokenizer.vocab_size > model.config.vocab_size:
            raise CpmliveError(f"vocabulary has {tokenizer.vocab_size} tokens, the model expects "
                               f"{model.config.vocab_size}")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.tasks: dict[str, TaskSpec] = {}
        self.active: str | None = None
        self.lock = threading.RLock()
        self.bee_text_field = TEXT_FIELD  # a CPM-Bee model: the task field a completion prompt goes in
        self._engine: Engine | None = None
        # by adapter (None: the base model); a tokenizer's own template serves adapters without one
        self.chat_templates: dict[str | None, ChatTemplate | TokenizerChatTemplate | EvaDialogue] = {}
        # The decoding options a model directory asks for (its generation_config.json), under the caller's.
        self.generation_defaults: dict[str, Any] = {}
        self.assistant: Assistant | None = None  # the draft model of every request (set_assistant)
        self._assistants: dict[str, Assistant] = {}  # loaded by path

    @property
    def engine(self) -> Engine:
        """The scheduler ``generate`` and ``stream`` (and a server) run on, made on first use."""
        with self.lock:
            if self._engine is None:
                self._engine = Engine(self.model, self.tokenizer)
            return self._engine

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a generation (:func:`stop_ids_of` the tokenizer)."""
        return stop_ids_of(self.tokenizer)

    @property
    def config(self) -> Any:
        """The model's config (its family's config class)."""
        return self.model.config

    # ---- adapters ---------------------------------------------------------------------------

    @property
    def task(self) -> TaskSpec | None:
        """The task of the active adapter (None: the base model)."""
        return self.tasks.get(self.active) if self.active else None

    @property
    def prompt_task(self) -> int | None:
        return self.task.prompt_task if self.task is not None else None

    def add_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Attach a saved adapter (refused if trained on another base) and make it active."""
        if getattr(self.model, "device_stream", None) is not None:
            raise CpmliveError("an adapter cannot be attached to a model under a memory limit on a GPU (its blocks "
                               "move between host and device memory): load it without --memory-limit")
        from cpmlive.tune import delta

        name = name or Path(path).resolve().name
        with self.lock:
            spec = TaskSpec.load(path) if (Path(path) / "task.json").is_file() else TaskSpec()
            delta.load_adapter(self.model, path, name=name)
            self.tasks[name] = spec
            template = ChatTemplate.load(path)
            if template is not None:
                self.chat_templates[name] = template
            self.use(name)
        return name

    def use(self, name: str | None) -> None:
        """Route every call through adapter ``name`` (None: the bare base model)."""
        from cpmlive.tune import delta

        if name is not None and name not in self.tasks:
            raise CpmliveError(f"no adapter named {name!r} (loaded: {', '.join(self.tasks) or 'none'})")
        if name is not None or delta.delta_state(self.model) is not None:
            delta.set_active_adapter(self.model, name)
        self.active = name

    @contextmanager
    def using(self, name: str | None) -> Iterator["LM"]:
        """Hold the model with adapter ``name`` active (per request in a server)."""
        with self.lock:
            previous = self.active
            self.use(name)
            try:
                yield self
            finally:
                self.use(previous)

    @property
    def has_classifier_head(self) -> bool:
        """Whether the model carries a classification head of its own (a fine-tuned BERT's)."""
        return hasattr(self.model, "classifier") and hasattr(self.model, "classify")

    def classify(self, texts: str | Sequence[str]) -> str | list[str]:
        """The most likely label of each text: under the active classification adapter, or by the
        model's own classification head (a fine-tuned encoder's, its config's labels)."""
        self.require("classify")
        spec = self.task
        if spec is None and self.has_classifier_head:
            return self._classify_with_head(texts)
        if spec is None or spec.task != "classify":
            raise CpmliveError("classify needs a classification adapter (load one with adapter=PATH)")
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or any(not isinstance(t, str) or not t.strip() for t in items):
            raise CpmliveError("empty text")
        with torch.inference_mode():
            scores = classify_scores(self.model, self.tokenizer, spec, items)
        labels = [spec.labels[i] for i in scores.argmax(-1).tolist()]
        return labels[0] if isinstance(texts, str) else labels

    def _classify_with_head(self, texts: str | Sequence[str]) -> str | list[str]:
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or any(not isinstance(t, str) or not t.strip() for t in items):
            raise CpmliveError("empty text")
        rows = [self.tokenizer.encode_for_model(text) for text in items]
        self._check_length(max(map(len, rows)))
        width, pad = max(map(len, rows)), self.tokenizer.pad_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=self._device)
        valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows], device=self._device)
        with self.lock, torch.inference_mode():
            chosen = self.model.classify(self.model.encoder_states(ids, valid)).argmax(-1).tolist()
        names = self.config.labels or [f"LABEL_{i}" for i in range(self.config.num_labels)]
        labels = [names[i] for i in chosen]
        return labels[0] if isinstance(texts, str) else labels

    # ---- text <-> ids -----------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """``<s>`` + the text's ids; under a task adapter, the text goes through its template and
        is cut to the adapter's input length, as in fine-tuning."""
        return self.encode_for(text, self.active)

    def encode_for(self, text: str, adapter: str | None) -> list[int]:
        """:meth:`encode_prompt` as if ``adapter`` were active."""
        self.require("generate")
        if self.can("bee"):
            raise CpmliveError("a CPM-Bee model reads tasks, not token rows: use generate, stream, chat or bee")
        if not isinstance(text, str) or not text.strip():
            raise CpmliveError("empty prompt")
        task = self.tasks.get(adapter) if adapter else None
        if task is not None:
            ids, cut = encode_input(self.tokenizer, task, text)
            if cut:
                warnings.warn(f"input truncated to its first {task.max_input_tokens} tokens", stacklevel=3)
            return ids + self.model.prompt_tail()
        return self.encode_raw(text)

    def encode_raw(self, text: str) -> list[int]:
        """``<s>`` + the text's ids, no task template (a chat-rendered prompt is already laid out)."""
        ids = self.encode_context(text)
        if not ids:
            raise CpmliveError("the prompt has no tokens")
        ids = ids + self.model.prompt_tail()
        self._check_length(len(ids))
        return ids

    # ---- chat -------------------------------------------------------------------------------

    def chat_template(self, adapter: str | None | bool = True) -> ChatTemplate | TokenizerChatTemplate:
        """The chat template of ``adapter`` (default: the active one): its own, else the
        tokenizer's (an HF model's); refused when it has none."""
        self.require("chat")
        name = self.active if adapter is True else adapter
        template = self.find_chat_template(name)
        if template is None:
            tune = ("tune one with `cpmlive align sft`, or use generate" if self.family.can("align")
                    else f"the alignment recipes tune {owners('align')} models, not {self.family.name}: use generate")
            raise CpmliveError(f"this model has no chat template (it was not tuned for chat): {tune}")
        return template

    def find_chat_template(self, adapter: str | None) -> ChatTemplate | TokenizerChatTemplate | BeeDialogue | None:
        """``adapter``'s own template, else a tokenizer's own (which every adapter of the model
        shares); a CPM-Bee model's conversations are its dialogue task."""
        if self.can("bee"):
            return BeeDialogue()
        template = self.chat_templates.get(adapter)
        base = self.chat_templates.get(None)
        shared = isinstance(base, (TokenizerChatTemplate, EvaDialogue))  # the model's own: every adapter's too
        return template if template is not None or not shared else base

    def encode_chat(self, messages: Sequence[dict],
                    template: ChatTemplate | TokenizerChatTemplate) -> list[int]:
        """The ids of ``messages`` through ``template``, opening the assistant's turn."""
        return self.encode_rendered(template.render(list(messages)), template)

    def encode_rendered(self, text: str, template: ChatTemplate | TokenizerChatTemplate) -> list[int]:
        """The ids of ``template``'s output ``text``: a tokenizer's template writes its special
        tokens itself (encoded with none added, as HF's ``apply_chat_template``), a CPM
        template's text is encoded as a prompt."""
        if not getattr(template, "writes_special_tokens", False):
            return self.encode_raw(text)
        ids = self.tokenizer.encode(text)
        if not ids:
            raise CpmliveError("the prompt has no tokens")
        self._check_length(len(ids))
        return ids

    def chat_stream(self, messages: Sequence[dict], max_new_tokens: int | None = None,
                    **kwargs: object) -> Iterator[str]:
        """The assistant's next message, streamed; generation stops where the template's next turn
        opens, or at its end-of-turn token (``max_new_tokens``: 128 unless the model's generation
        config says)."""
        template = self.chat_template()
        extras = request_extras(kwargs)
        options = self._options(max_new_tokens, kwargs, default_new_tokens=128)
        if options.num_beams > 1:
            raise CpmliveError("streaming works with greedy or sampled decoding, not beam search")
        if isinstance(template, BeeDialogue):
            yield from self._streamed(self.prompt_request(template.render(list(messages)), options, **extras))
            return
        ids = self.encode_chat(messages, template)
        self._check_length(len(ids), options.max_new_tokens)
        yield from self._streamed(self.request(ids, options, stop=tuple(template.stop), **extras,
                                               stop_ids=getattr(template, "stop_ids", frozenset())))

    def chat(self, messages: Sequence[dict], max_new_tokens: int | None = None, **kwargs: object) -> str:
        return "".join(self.chat_stream(messages, max_new_tokens, **kwargs))

    def _check_length(self, tokens: int, new_tokens: int = 0) -> None:
        limit = self.config.max_length - self.config.prompt_length
        if tokens > limit:
            raise CpmliveError(f"prompt is {tokens} tokens long; this model takes at most {limit}")
        if tokens + new_tokens > limit:
            raise CpmliveError(f"the prompt's {tokens} tokens and max_new_tokens {new_tokens} exceed the "
                               f"model's {limit} positions: ask for at most {limit - tokens} new tokens")

    def _check_blanks(self, tokens: int, blanks: int, longest: int) -> None:
        """The text's own tokens first, then the blanks at their longest (max_new_tokens each by default)."""
        self._check_length(tokens)
        limit = self.config.max_length - self.config.prompt_length
        if tokens + blanks * longest > limit:
            raise CpmliveError(f"{blanks} blank{'s' * (blanks != 1)} of up to {longest} tokens (max_new_tokens, "
                               f"or the longest blank length) and the text's {tokens} tokens exceed the model's "
                               f"{limit} positions: ask for at most {(limit - tokens) // blanks} tokens a blank")

    def _options(self, max_new_tokens: int | None, kwargs: dict, default_new_tokens: int = 64) -> GenerationConfig:
        """The decoding options: the caller's, then the model's generation config for what the
        caller left out (:func:`with_defaults`), then ``default_new_tokens``."""
        self.require("generate")
        given = {key: value for key, value in kwargs.items() if value is not None}
        if max_new_tokens is not None:
            given["max_new_tokens"] = max_new_tokens
        options = with_defaults(given, self.generation_defaults)
        options.setdefault("max_new_tokens", default_new_tokens)
        return GenerationConfig.from_kwargs(**options)

    @property
    def family(self) -> Family:
        return family(self.model.config.model_type)

    def can(self, ability: str) -> bool:
        """Whether this model's family does ``ability`` (a key of ``model.families.ABILITIES``)."""
        return self.family.can(ability)

    def require(self, ability: str) -> None:
        """Refuse, in one line, what this model's family cannot do (before any work)."""
        self.family.require(ability)

    # ---- CPM-Bee JSON tasks -------------------------------------------------------------------

    def bee(self, task: dict | str | Sequence[dict | str], max_new_tokens: int = 64,
            adapter: str | None | bool = True, examples: Sequence[dict] = (), **kwargs: object) -> dict | list[dict]:
        """Fill every ``<ans>`` leaf of a CPM-Bee task (a dict, or its JSON text), or of each
        task of a list. Decoding options as for ``generate`` (``num_beams``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``: a seeded list
        gives task ``i`` the seed ``seed + i``); ``max_new_tokens`` counts every decoding step,
        the ``</s>`` between answers included. A leaf decoding never reaches is ``None``.
        ``examples``: filled tasks each task reads in context first (few-shot, as CPM-Bee's
        pretraining packs them: :func:`cpmlive.data.bee.prompt_for`).

        Greedy and sampled tasks join the engine's continuous batch, one request each (see
        :meth:`bee_request`); beam search (and greedy with a ``length_penalty`` other than 1,
        which only beam search's hypotheses honour) runs as a job, as do calls from a job."""
        self.require("bee")
        single = isinstance(task, (dict, str))
        items = [task] if single else list(task)
        if not items:
            raise CpmliveError("no task given")
        tasks = [parse_task(item, f"task {i + 1}") if isinstance(item, str) else check_task(item, f"task {i + 1}")
                 for i, item in enumerate(items)]
        options = GenerationConfig.from_kwargs(max_new_tokens=max_new_tokens, **kwargs)
        if self._bee_in_batch(options):
            handles = [self.engine.submit(self.bee_request(t, options, i, adapter, examples=examples))
                       for i, t in enumerate(tasks)]
            results = [self.bee_result(handle) for handle in handles]
        else:
            with self.using(self.active if adapter is True else adapter):
                results, _ = self.engine.call(fill_tasks, self.model, self.tokenizer, tasks, options,
                                              examples).result()
        return results[0] if single else results

    def _bee_in_batch(self, options: GenerationConfig) -> bool:
        return options.num_beams == 1 and (options.do_sample or options.length_penalty == 1.0) \
            and not self.engine.is_driving()

    def bee_request(self, task: dict, options: GenerationConfig, index: int = 0,
                    adapter: str | None | bool = True, plain: bool = False, examples: Sequence[dict] = (),
                    **fields: Any) -> Request:
        """An engine request that fills ``task`` (checked, after its in-context ``examples``) in
        the continuous batch; ``plain``: its answer is text for people (``<`` unescaped), as a
        completion's or a chat reply's."""
        prepared = prepare_task(self.tokenizer, check_task(task, "task"), self.model.input_embedding.weight.device,
                                plain, examples)
        return self._task_request(prepared, options, index, adapter, **fields)

    def _task_request(self, task: Task, options: GenerationConfig, index: int, adapter: str | None | bool,
                      **fields: Any) -> Request:
        self._check_length(len(task.prompt.ids), options.max_new_tokens)
        return self.request(task.prompt.ids, options, index, adapter=adapter, task=task,
                            **{"assistant": None, **fields})

    def bee_result(self, handle: Any) -> dict:
        """The filled task of a submitted :meth:`bee_request`."""
        return self.bee_filled(handle.request, handle.result())

    def bee_filled(self, request: Request, completion: Completion) -> dict:
        """``request``'s task with the answers of its ``completion``."""
        task = request.task
        tokens = list(zip(completion.ids, completion.answers))
        return filled(task.prompt, answer_texts(tokens, task.table, self.tokenizer))

    def _prompt_rows(self, texts: Sequence[str], options: GenerationConfig) -> list[list[int]]:
        rows = [self.encode_prompt(t) for t in texts]
        self._check_length(max(map(len, rows)), options.max_new_tokens)
        return rows

    # ---- generation -------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int | None = None,
                 **kwargs: object) -> str | list[str]:
        """Continue each prompt; keyword names as in HF ``generate`` plus ``seed``. What is not
        given comes from the model's ``generation_config.json`` where it has one (as in HF), else
        the defaults of :class:`GenerationConfig` (64 new tokens, greedy)."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.can("bee"):
            outputs = self._bee_texts(texts, max_new_tokens, kwargs)
        else:
            ids = self.generate_ids(texts, max_new_tokens=max_new_tokens, **kwargs)
            outputs = [self.tokenizer.decode(row) for row in ids]
        return outputs[0] if isinstance(prompt, str) else outputs

    def _bee_texts(self, texts: Sequence[str], max_new_tokens: int | None, kwargs: dict) -> list[str]:
        """CPM-Bee's continuation of each text: the answer of its text-generation task."""
        if not texts:
            raise CpmliveError("no prompt given")
        extras = request_extras(kwargs)
        options = self._options(max_new_tokens, kwargs)
        if self._bee_in_batch(options):
            handles = [self.engine.submit(self.prompt_request(text, options, index, **extras))
                       for index, text in enumerate(texts)]
            return [handle.result().text for handle in handles]
        tasks = [text_task(text, self.bee_text_field) for text in texts]
        results, _ = self.engine.call(fill_tasks, self.model, self.tokenizer, tasks, options).result()
        return [unescape(result["<ans>"] or "") for result in results]

    def prompt_source(self, prompt: str | dict | list[int] | Task, adapter: str | None | bool = True
                      ) -> list[int] | Task:
        """What a prompt is to the engine, made once for every request of it: its ids (a text
        encoded), or for a CPM-Bee model the prepared task (a text goes into its text-generation
        task; a dict is a task whose answer is text for people, a rendered conversation)."""
        if isinstance(prompt, (list, Task)):
            return prompt
        if not self.can("bee"):
            return self.encode_for(prompt, self.active if adapter is True else adapter)
        task = prompt if isinstance(prompt, dict) else text_task(prompt, self.bee_text_field)
        return prepare_task(self.tokenizer, check_task(task, "task"), self.model.input_embedding.weight.device, True)

    def prompt_request(self, prompt: str | dict | list[int] | Task, options: GenerationConfig, index: int = 0,
                       adapter: str | None | bool = True, **fields: Any) -> Request:
        """The engine request of a prompt (see :meth:`prompt_source`)."""
        source = self.prompt_source(prompt, adapter)
        if isinstance(source, Task):
            return self._task_request(source, options, index, adapter, **fields)
        return self.request(source, options, index, adapter=adapter, **fields)

    def generate_ids(self, texts: Sequence[str], max_new_tokens: int | None = None,
                     **kwargs: object) -> list[list[int]]:
        """New token ids per prompt. Greedy and sampled prompts go through the engine, each as its
        own request (a seeded batch gives row ``i`` the seed ``seed + i``); beam search, and calls
        made from a job the engine runs, decode directly."""
        if not texts:
            raise CpmliveError("no prompt given")
        extras = request_extras(kwargs)
        options = self._options(max_new_tokens, kwargs)
        rows = self._prompt_rows(texts, options)
        if options.num_beams > 1 or self.engine.is_driving():
            where = "beam search" if options.num_beams > 1 else "a job running on the engine"
            if options.speculates or extras["assistant"] not in (True, None, False) or (
                    extras["assistant"] is True and self.assistant is not None):
                raise CpmliveError(f"speculative decoding runs in the engine's batch, not in {where}")
            if extras["constraint"] is not None:
                raise CpmliveError(f"structured output runs in the engine's batch, not in {where}")
            return generate_ids(self.model, rows, options, self.stop_ids, self.prompt_task)
        handles = [self.engine.submit(self.request(row, options, index, **extras)) for index, row in enumerate(rows)]
        return [handle.result().ids for handle in handles]

    def sample(self, prompt: str, num_return_sequences: int, max_new_tokens: int | None = None,
               **kwargs: object) -> list[str]:
        """``num_return_sequences`` continuations of one prompt, sampled unless beam or greedy
        options say otherwise (a seed gives sample ``i`` the seed ``seed + i``)."""
        if num_return_sequences < 1:
            raise CpmliveError("num_return_sequences must be at least 1")
        return self.generate([prompt] * num_return_sequences, max_new_tokens=max_new_tokens, **kwargs)

    def vote(self, prompt: str, num_return_sequences: int = 5, max_new_tokens: int = 32,
             stop: Sequence[str] = (), **kwargs: object) -> Vote:
        """Self-consistency: sample ``num_return_sequences`` answers (``do_sample`` is implied),
        cut each at its first line break or ``stop`` string, and return the most frequent with
        every answer's count (:func:`cpmlive.infer.vote.vote`)."""
        kwargs.setdefault("do_sample", True)
        if not kwargs["do_sample"]:
            raise CpmliveError("voting needs sampled answers (greedy ones are all the same)")
        return vote(self.sample(prompt, num_return_sequences, max_new_tokens, **kwargs), stop)

    def request(self, ids: list[int], options: GenerationConfig, index: int = 0, adapter: str | None | bool = True,
                assistant: Any = True, **fields: object) -> Request:
        """An engine request for ``ids`` under ``adapter`` (default: the active one), drafted by
        ``assistant`` (default: :attr:`assistant`; ``None``: no draft model)."""
        name = self.active if adapter is True else adapter
        spec = self.tasks.get(name) if name else None
        prompt_task = spec.prompt_task if spec is not None else None
        return request_for(ids, options, index, adapter=name, prompt_task=prompt_task,
                           assistant=self.assistant_for(assistant), **fields)

    # ---- speculative decoding --------------------------------------------------------------

    def set_assistant(self, assistant_model: Any) -> None:
        """Draft every request with ``assistant_model`` (speculative decoding; see
        :mod:`cpmlive.infer.speculative`): a path or name to load, an :class:`LM`, or a model of
        this vocabulary; ``None`` stops drafting."""
        self.assistant = self.assistant_for(assistant_model)

    def assistant_for(self, assistant_model: Any) -> Assistant | None:
        """The draft model ``assistant_model`` names (``True``: :attr:`assistant`), its vocabulary
        checked against this model's."""
        if assistant_model is True:
            return self.assistant
        if assistant_model is None or assistant_model is False or isinstance(assistant_model, Assistant):
            return assistant_model or None
        if isinstance(assistant_model, LM):
            assistant = Assistant(assistant_model.model, assistant_model.tokenizer, assistant_model.name)
        elif isinstance(assistant_model, nn.Module):
            assistant = Assistant(assistant_model, self.tokenizer)
        else:
            key = str(assistant_model)
            if key not in self._assistants:
                draft = load(assistant_model)
                assistant = Assistant(draft.model, draft.tokenizer, draft.name)
                assistant.check(self.tokenizer, self.model)
                self._assistants[key] = assistant
            return self._assistants[key]
        assistant.check(self.tokenizer, self.model)
        return assistant

    def stream(self, prompt: str, max_new_tokens: int | None = None, stop: Sequence[str] = (),
               **kwargs: object) -> Iterator[str]:
        """Yield new text as soon as it is chosen (held back only while it may be the start of
        a ``stop`` string, where the text ends)."""
        extras = request_extras(kwargs)
        options = self._options(max_new_tokens, kwargs)
        if options.num_beams > 1:
            raise CpmliveError("streaming works with greedy or sampled decoding, not beam search")
        if self.can("bee"):
            yield from self._streamed(self.prompt_request(prompt, options, stop=tuple(stop), **extras))
            return
        row = self._prompt_rows([prompt], options)[0]
        yield from self._streamed(self.request(row, options, stop=tuple(stop), **extras))

    def _streamed(self, request: Request) -> Iterator[str]:
        """The text of one engine request as it is decoded."""
        handle = self.engine.submit(request)
        try:
            for event in handle:
                if event.error is not None:
                    raise CpmliveError(event.error)
                if event.text:
                    yield event.text
        finally:
            handle.cancel()  # a consumer that stops early frees the row

    # ---- blank infilling -------------------------------------------------------------------

    def fill(self, text: str | Sequence[str], max_new_tokens: int = 4, blank_lengths: Sequence[int] | None = None,
             return_fills: bool = False, **kwargs: object) -> str | list[str] | list:
        """Replace every ``<mask>`` with generated text (blank infilling, for families that can ``fill``).

        Each blank becomes ``n`` non-context tokens decoded left to right, for every candidate
        ``n`` in ``blank_lengths`` (default 1..max_new_tokens, the same ``n`` for every blank);
        the completed text read most fluently by the model wins.
        """
        if not isinstance(text, str):
            return [self.fill(t, max_new_tokens, blank_lengths, return_fills, **kwargs) for t in text]
        self.require("fill")
        if MASK not in text:
            raise CpmliveError("fill needs at least one <mask> in the text")
        if getattr(self.model, "fills_in_place", False) or hasattr(self.model, "sentinel_text"):
            if blank_lengths:
                raise CpmliveError(f"{self.family.name} decides each blank's length itself: blank lengths apply to "
                                   "infilling models (CPM-Ant)")
            fills = self._unmask(text) if getattr(self.model, "fills_in_place", False) else \
                self._fill_spans(text, max_new_tokens, kwargs)
            return fills if return_fills else "".join(
                part + (fills[i] if i < len(fills) else "") for i, part in enumerate(text.split(MASK)))
        options = self._options(max_new_tokens, kwargs)
        if options.num_beams > 1:
            raise CpmliveError("fill decodes greedily or by sampling; num_beams is not supported")
        if options.speculates:
            raise CpmliveError("fill does not draft tokens: speculative decoding serves generate, stream and chat")
        lengths = list(blank_lengths) if blank_lengths else list(range(1, options.max_new_tokens + 1))
        if not lengths or min(lengths) < 1:
            raise CpmliveError("blank lengths must be positive")
        pieces = [self.tokenizer.encode_for_model(part)[1:] if part else [] for part in text.split(MASK)]
        self._check_blanks(1 + sum(map(len, pieces)) + 1, len(pieces) - 1, max(lengths))
        candidates = fill_blanks(self.model, pieces, lengths, options, self.tokenizer.bos_id,
                                 self.tokenizer.eos_id)
        blanks, _ = max(candidates, key=lambda item: item[1])
        fills = [self.tokenizer.decode(b) for b in blanks]
        if return_fills:
            return fills
        parts = text.split(MASK)
        return "".join(p + (fills[i] if i < len(fills) else "") for i, p in enumerate(parts))

    def _fill_spans(self, text: str, max_new_tokens: int, kwargs: dict) -> list[str]:
        """An encoder-decoder's fill (span corruption): blank ``i`` is sentinel ``i`` in the input,
        and the decoder writes each span after its sentinel, at most ``max_new_tokens`` per blank."""
        parts = text.split(MASK)
        sentinels = []
        for index in range(len(parts)):
            ids = self.tokenizer.encode(self.model.sentinel_text(index))
            if len(ids) != 1:
                raise CpmliveError(f"the vocabulary has no {self.model.sentinel_text(index)} for blank {index + 1}")
            sentinels.append(ids[0])
        masked = "".join(part + (self.model.sentinel_text(i) if i < len(parts) - 1 else "")
                         for i, part in enumerate(parts))
        out = self.generate_ids([masked], max_new_tokens * (len(parts) - 1) + len(parts), **kwargs)[0]
        out = out[1:] if out[:1] == sentinels[:1] else out
        spans: list[list[int]] = [[]]
        for token in out:
            if token in sentinels:
                spans.append([])
            else:
                spans[-1].append(token)
        return [self.tokenizer.decode(span[:max_new_tokens]) for span in spans[:len(parts) - 1]] + \
            [""] * max(0, len(parts) - 1 - len(spans))

    def _unmask(self, text: str) -> list[str]:
        """An encoder's fill (BERT's fill-mask): each ``<mask>`` is its mask token, all read at once,
        and each becomes its most likely token."""
        mask_id = self.tokenizer.mask_id
        if mask_id is None:
            raise CpmliveError("this tokenizer names no mask token (mask_token in tokenizer_config.json)")
        parts = [self.tokenizer.encode(part) for part in text.split(MASK)]
        ids = self.tokenizer.encode_for_model("")
        body = [token for index, part in enumerate(parts) for token in ([mask_id] if index else []) + part]
        ids = ids[:1] + body + ids[1:] if len(ids) == 2 else body
        self._check_length(len(ids))
        with self.lock, torch.no_grad():
            logits = self.model.logits(self.model(torch.tensor([ids], device=self._device)))[0]
        return [self.tokenizer.decode([int(logits[position].argmax())]).strip()
                for position, token in enumerate(ids) if token == mask_id]

    # ---- scoring ----------------------------------------------------------------------------

    def encode_context(self, text: str) -> list[int]:
        """A text's ids as a prompt starts (the family's ``<s>`` where it has one, the tokenizer's
        special tokens; an encoder-decoder's encoder row), without a task template or the
        decoder's start: what :meth:`score` reads as a context."""
        ids = self.tokenizer.encode_for_model(text)
        if getattr(self.tokenizer, "adds_bos", True) and ids[:1] != [self.tokenizer.bos_id]:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def score(self, pairs: Sequence[tuple], batch_size: int = 8) -> list[tuple[float, bool]]:
        """``log P(continuation | context)`` of each ``(context, continuation)`` pair (texts, or
        ids as :meth:`encode_context` and ``tokenizer.encode`` give them), and whether greedy
        decoding writes the continuation: the context read as a prompt, the continuation
        predicted after it as ``generate`` writes it. A third item is text that follows the
        continuation (a template's rest after its mask): CPM-Ant reads it on the far side of the
        blank the continuation fills, other families write it after the continuation (see
        :mod:`cpmlive.model.scoring`). Batches of ``batch_size`` pairs of similar lengths run as
        engine jobs (requests being decoded go on between them)."""
        self.require("generate")
        if self.can("bee"):
            raise CpmliveError("CPM-Bee does not score free continuations: it chooses among a task's options "
                               "(bee with \"options\")")
        start = self.tokenizer.eos_id if self.tokenizer.bos_id is None else self.tokenizer.bos_id
        rows = [self._score_row(pair, start) for pair in pairs]
        order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        size = max(1, batch_size)
        for first in range(0, len(order), size):
            chunk = order[first:first + size]
            scored = self.engine.call(continuation_logprobs, self.model, [rows[i] for i in chunk],
                                      self.tokenizer.eos_id).result()
            for index, result in zip(chunk, scored):
                results[index] = result
        return results

    def _score_row(self, pair: tuple, start: int) -> tuple[list[int], ...]:
        if len(pair) not in (2, 3):
            raise CpmliveError("a pair to score is (context, continuation) or (context, continuation, after)")
        context, continuation, *after = pair
        if isinstance(context, str):
            context = self.encode_context(context)
            continuation, after = self.tokenizer.encode(continuation), [self.tokenizer.encode(a) for a in after]
        if not continuation:
            raise CpmliveError("a continuation to score is empty")
        row = (list(context) or [start], list(continuation), *(list(a) for a in after))
        self._check_length(sum(map(len, row)) + (1 if any(after) else 0))  # an infilled row closes with eos
        return row

    # ---- embeddings -------------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], pooling: str = "mean", normalize: bool = False,
              ) -> list[float] | list[list[float]]:
        """Each text's vector from the encoder's final hidden states: their mean over its tokens
        (sentence-transformers' pooling), the first token's (``cls``) or BERT's pooler output
        (``pooler``); ``normalize``: unit length (cosine similarity as a dot product)."""
        self.require("embed")
        if pooling not in ("mean", "cls", "pooler"):
            raise CpmliveError(f"pooling must be mean, cls or pooler, not {pooling!r}")
        rows = [self.tokenizer.encode_for_model(text) for text in ([texts] if isinstance(texts, str) else texts)]
        if not rows or not all(rows):
            raise CpmliveError("nothing to embed: give at least one non-empty text")
        self._check_length(max(map(len, rows)))
        width = max(map(len, rows))
        pad = self.tokenizer.pad_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=self._device)
        valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows], device=self._device)
        with self.lock, torch.no_grad():
            states = self.model.encoder_states(ids, valid).float()
            if pooling == "pooler":
                vectors = self.model.pooled(states)
            elif pooling == "cls":
                vectors = states[:, 0]
            else:
                vectors = (states * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1e-9)
        if normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        out = vectors.cpu().tolist()
        return out[0] if isinstance(texts, str) else out

    @property
    def _device(self) -> torch.device:
        return self.model.input_embedding.weight.device


def request_extras(kwargs: dict) -> dict[str, Any]:
    """Take what a request carries besides its decoding options out of ``kwargs``: its draft
    model (``assistant_model``, HF's name; default the LM's own) and its structured-output
    constraint (OpenAI's ``response_format``, vLLM's ``guided_regex`` / ``guided_grammar``)."""
    constraint = constraint_from(kwargs.pop("response_format", None), kwargs.pop("guided_regex", None),
                                 kwargs.pop("guided_grammar", None))
    return {"assistant": kwargs.pop("assistant_model", True), "constraint": constraint}


def find_vocab(vocab: str | os.PathLike | None, directory: Path | None, name: str, kind: Family) -> Path:
    """The vocabulary given, else the checkpoint's own: never another model's."""
    if vocab is not None:
        path = Path(vocab)
        if not path.is_file():
            raise CpmliveError(f"{vocab}: vocabulary file not found")
        return path
    if directory is not None and (directory / kind.vocab_name).is_file():
        return directory / kind.vocab_name
    if directory is None:
        raise CpmliveError(f"preset {name} has random weights and no vocabulary: pass vocab=PATH (--vocab) "
                           f"with its vocab_size tokens (e.g. the published {kind.vocab_example or kind.vocab_name})")
    raise CpmliveError(f"{directory}: no {kind.vocab_name} in the checkpoint; pass vocab=PATH (--vocab)")


def load(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "cpu",
         vocab: str | os.PathLike | None = None, hf_tokenizer: bool = False, seed: int = 0,
         adapter: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
         memory_limit: int | str | None = None, stored_weights: bool = False) -> LM:
    """A checkpoint (ours, HF's or OpenBMB's: a directory or a weights file), ``"demo"`` (the
    shipped model) or a preset name (random weights).

    Random-weight presets need a vocabulary of their ``vocab_size``: pass ``vocab=``.
    ``adapter``: one or more adapter directories (or names of shipped ones, e.g. ``"headline"``);
    the last one given is active, ``lm.use(name)`` switches. ``memory_limit`` (bytes, or a size
    such as ``"4GB"``): keep at most that much of the weights resident and stream the other
    blocks from the checkpoint (``cpmlive.model.runtime.streaming``). ``stored_weights``: keep the weight
    matrices of a float16/bf16 checkpoint in that dtype and compute in float32 from them (the same
    values: the products convert them exactly), with half the memory and half the bytes read per
    decoded token; CPM-1's release is float16.
    """
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None and torch.device(device).type == "cpu":
        torch_dtype = torch.float32  # CPUs have no fast float16 kernels: compute float16 checkpoints in float32
    path = check_model(name_or_path)
    directory: Path | None
    if path.exists():
        kind = family_of(path)
        # --memory-limit streams the stored bytes as they are
        keep = {"keep_matrices": True} if memory_limit is not None or stored_weights else {}
        # under a budget on an accelerator the weights load on the host and move there block by block
        on_host = memory_limit is not None and torch.device(device).type != "cpu"
        model, directory = kind.load(path, dtype=torch_dtype, device="cpu" if on_host else device, **keep)
    elif (kind := preset_family(str(name_or_path))) is not None:
        config = kind.presets[str(name_or_path)]()
        model = kind.build(config, device=device, dtype=torch_dtype or torch.float32, seed=seed).eval()
        directory = None
    else:
        raise CpmliveError(f"{name_or_path}: no such checkpoint or preset (presets: {', '.join(sorted(ALL_PRESETS))})")
    if memory_limit is not None:
        limit = parse_size(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
        if torch.device(device).type == "cpu":
            stream_weights(model, limit)
        else:
            offload_to_device(model, limit, device)
    vocab_file = find_vocab(vocab, directory, str(name_or_path), kind)
    tokenizer = kind.tokenizer.for_model(vocab_file, model.config.vocab_size, hf_compat=hf_tokenizer)
    lm = LM(model, tokenizer, name=str(path if directory is not None else name_or_path))
    if getattr(model.config, "dialogue", False):  # EVA's dialogue form (the CPM-2 family)
        lm.chat_templates[None] = EvaDialogue(tokenizer.sep_id)
    elif getattr(tokenizer, "chat_template", None) is not None:  # an HF model's own (its chat_template.json
        lm.chat_templates[None] = TokenizerChatTemplate(tokenizer)  # would be HF's, not ours)
    elif directory is not None and (template := ChatTemplate.load(directory)) is not None:
        lm.chat_templates[None] = template
    if directory is not None:
        lm.generation_defaults = hf_generation_defaults(directory)
    paths = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter or [])
    for path in paths:
        lm.add_adapter(adapter_path(path))
    return lm


__all__ = ["LM", "load"]
