"""EleutherAI's lm-evaluation-harness over cpmlive: a registered model class (``cpmlive``) that
runs any cpmlive model, with its adapter, through :class:`cpmlive.api.LM` (scores as engine
jobs, generations in the engine's batch), and :func:`run_tasks`, what ``cpmlive evaluate MODEL
--tasks ...`` calls.

Requests are the harness's own: ``loglikelihood`` pairs are split as its ``TemplateLM`` splits
them (the context's trailing space moved to the continuation, context and continuation encoded
together and cut at the context's length, as its ``hf`` backend does, so that the two agree to
the last digit on a model both can read), ``loglikelihood_rolling`` scores a text in windows of
the model's length after its ``<s>`` (or its end-of-text token), ``generate_until`` decodes
greedily (or as the task's ``gen_kwargs`` say) and cuts at the first stop string.

Tasks are the harness's YAML configs. Our local ones (``assets/tasks``, built over files that
``cpmlive data tasks`` writes) work offline; ``--include`` adds a folder of the user's; the
harness's built-in tasks (C-Eval, CMMLU...) and our CLUE tasks need their datasets from the HF
hub (``CPMLIVE_HARNESS_ONLINE=1``).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cpmlive.api import LM as CpmliveModel
from cpmlive.errors import CpmliveError
from cpmlive.resources import ASSETS

TASKS_DIR = "tasks"  # under the package's assets: our local task YAMLs
MODEL_NAME = "cpmlive"
ONLINE = "CPMLIVE_HARNESS_ONLINE"


def online() -> bool:
    """``CPMLIVE_HARNESS_ONLINE=1``: the harness's built-in tasks are indexed and datasets may come
    from the HF hub; otherwise (the default) the hub is not asked and only local tasks run."""
    return os.environ.get(ONLINE) == "1"


def _harness():
    """lm-eval's modules, its built-in model names registered first (``lm_eval.models`` registers
    them only into an empty registry: ours, registered before, would hide ``hf``)."""
    if not online():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval.models  # noqa: F401
        from lm_eval.api import model, registry
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise CpmliveError(f"lm-evaluation-harness is not installed ({exc}): pip install lm_eval") from None
    return model, registry


def harness_model_class() -> type:
    """The ``cpmlive`` model class of lm-eval's registry (made and registered once)."""
    model, registry = _harness()
    try:
        return registry.get_model(MODEL_NAME)
    except (ValueError, KeyError):
        pass
    cls = _make_class(model.TemplateLM)
    registry.register_model(MODEL_NAME)(cls)
    return cls


def _make_class(template_lm: type) -> type:
    class HarnessLM(template_lm):
        """lm-eval's view of a cpmlive model (``model_args``: ``model=NAME_OR_PATH``, and
        ``adapter``, ``dtype``, ``batch_size`` as ``cpmlive.load`` and :meth:`LM.score` take them)."""

        def __init__(self, model: str | CpmliveModel | None = None, adapter: str | None = None,
                     dtype: str | None = None, batch_size: int | str = 8, **_: Any) -> None:
            super().__init__()
            if model is None:
                raise CpmliveError("the cpmlive harness model needs model=NAME_OR_PATH")
            if isinstance(model, CpmliveModel):
                self.lm = model
            else:
                from cpmlive.api import load

                self.lm = load(model, dtype=dtype, adapter=adapter)
            self.lm.require("generate")
            self.batch = max(1, int(batch_size)) if str(batch_size).isdigit() else 8
            self.backend = "seq2seq" if hasattr(self.lm.model, "seq2seq") else "causal"

        @property
        def eot_token_id(self) -> int:
            return self.lm.tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.lm.tokenizer.bos_id
            return self.eot_token_id if bos is None else bos

        @property
        def max_length(self) -> int:
            return self.lm.config.max_length - self.lm.config.prompt_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
            """As the ``hf`` backend encodes: the tokenizer's special tokens by default (for a
            left-to-right family, the ``<s>`` a prompt starts with)."""
            if add_special_tokens is False or self.backend == "seq2seq":
                return self.lm.tokenizer.encode(string)
            return self.lm.tokenizer.encode_for_model(string)

        def tok_decode(self, tokens: Sequence[int], **_: Any) -> str:
            return self.lm.tokenizer.decode(tokens)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if self.backend != "seq2seq":
                return super()._encode_pair(context, continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            return self.lm.encode_context(context), self.lm.tokenizer.encode(continuation)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **_: Any) -> list:
            pairs = []
            for _, context, continuation in requests:
                if self.backend == "seq2seq" and context == [self.prefix_token_id]:
                    context = self.lm.encode_context("")
                pairs.append(self._fit(list(context), list(continuation)))
            return self.lm.score(pairs, batch_size=self.batch)

        def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
            """Cut from the left to the model's length, as the ``hf`` backend does."""
            if self.backend == "seq2seq":
                return context[-self.max_length:], continuation[:self.max_length - 1]
            joined = (context + continuation)[-self.max_length:]
            continuation = continuation[-(len(joined) - 1):]
            return joined[:len(joined) - len(continuation)], continuation

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            totals = []
            for (string,) in (request.args for request in requests):
                windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                    token_list=self.lm.tokenizer.encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                totals.append(sum(score for score, _ in self.lm.score(windows, batch_size=self.batch)))
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, options in (request.args for request in requests):
                options = dict(options or {})
                until = options.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                new_tokens = int(options.pop("max_gen_toks", 256))
                sample = bool(options.pop("do_sample", False))
                kwargs = {"do_sample": sample}
                if sample and "temperature" in options:
                    kwargs["temperature"] = float(options["temperature"])
                text = self.lm.generate(context, max_new_tokens=new_tokens, **kwargs)
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    HarnessLM.__name__ = HarnessLM.__qualname__ = "CpmliveHarnessLM"
    return HarnessLM


def local_tasks_dir() -> Path:
    return ASSETS / TASKS_DIR


def task_manager(include: Sequence[str | os.PathLike] = (), data_dir: str | os.PathLike | None = None):
    """lm-eval's task manager over our local tasks (their ``data_files`` pointed at ``data_dir``),
    the user's folders, and not the harness's thousands of built-in names unless asked
    (``include_defaults`` indexes them: seconds)."""
    _harness()
    from lm_eval.tasks import TaskManager

    folders = [str(_local_yamls(data_dir))] + [str(Path(f)) for f in include]
    for folder in folders[1:]:
        if not Path(folder).is_dir():
            raise CpmliveError(f"{folder}: no such folder of task YAMLs")
    return TaskManager(include_path=folders, include_defaults=online())


def _local_yamls(data_dir: str | os.PathLike | None) -> Path:
    """Our task YAMLs with ``{data_dir}`` filled in (the harness resolves a relative data file
    against the working directory, not the YAML's): written once per data folder to a temporary
    folder that goes when the process ends."""
    data = Path(data_dir or os.environ.get("CPMLIVE_TASK_DATA", "data/tasks")).resolve()
    return _filled_yamls(str(data))


@functools.lru_cache(maxsize=None)
def _filled_yamls(data: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="cpmlive-tasks-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for source in sorted(local_tasks_dir().glob("*.yaml")):
        (target / source.name).write_text(source.read_text(encoding="utf-8").replace("{data_dir}", data),
                                          encoding="utf-8")
    return target


def run_tasks(lm: CpmliveModel, tasks: Sequence[str], limit: int | None = None, num_fewshot: int | None = None,
              include: Sequence[str | os.PathLike] = (), data_dir: str | os.PathLike | None = None,
              batch_size: int = 8, seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on ``lm``: its results dict (``results`` per
    task, ``samples`` with every request's answer). An unknown task name: one line."""
    harness = harness_model_class()(model=lm, batch_size=batch_size)
    manager = task_manager(include, data_dir)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        local = ", ".join(sorted(n for n in known if n.startswith("cpmlive_"))) or "none"
        raise CpmliveError(f"unknown lm-eval task {unknown[0]!r} (local tasks: {local}; built-in tasks need "
                           f"{ONLINE}=1 and the HF hub)")
    from lm_eval import evaluator

    missing = [(t, path) for t in tasks if t in known and (path := _missing_data(manager, t))]
    if missing:
        raise CpmliveError(f"task {missing[0][0]}: its data file {missing[0][1]} does not exist "
                           "(cpmlive data tasks writes the local tasks' files)")
    try:
        return evaluator.simple_evaluate(model=harness, tasks=list(tasks), task_manager=manager, limit=limit,
                                         num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                                         random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
    except ConnectionError as exc:  # (datasets' hub errors are ConnectionErrors; offline ones included)
        hint = "" if online() else f" (the hub is not asked unless {ONLINE}=1)"
        raise CpmliveError(f"{str(exc).splitlines()[0]}{hint}") from None


def _missing_data(manager: Any, task: str) -> str | None:
    """A task's local data file that is not there (its path), else ``None``."""
    config = getattr(manager.task_index.get(task), "cfg", None) or {}
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    for value in (files.values() if isinstance(files, dict) else [files]):
        if isinstance(value, str) and not Path(value).is_file():
            return value
    return None


__all__ = ["MODEL_NAME", "harness_model_class", "local_tasks_dir", "run_tasks", "task_manager"]
