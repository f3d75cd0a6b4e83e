"""What TRL's trainers read from ``self`` when their loss methods are called outside a training
loop: a one-process accelerator and the bookkeeping fields, shared by the tests that compare our
losses with TRL's."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor

    @staticmethod
    def unwrap_model(model):
        return model


def trainer_stub(**fields) -> SimpleNamespace:
    base = dict(accelerator=Accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                _total_train_tokens=0, _tp_size=1, model=SimpleNamespace(training=True), aux_loss_enabled=False)
    return SimpleNamespace(**{**base, **fields})
