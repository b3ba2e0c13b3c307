"""Host stalls in a training step, and TRL trainers without the ones that only serve bookkeeping.

A GPU runs ahead of the host only while the host keeps queueing work; every `.item()` of a device tensor makes
the host wait until the queue is empty, and whatever the host does next leaves the GPU idle. transformers'
Trainer does that twice per micro-batch, right after queueing the backward: it moves the batch's non-padding
token count to the device and reads it back (`num_input_tokens_seen`), and it tests the loss for NaN for its
logging filter. The host then counts the model's parameters again (for the `total_flos` estimate: a walk over
every module) and unwraps the model again (accelerate walks every module looking for compiled regions), all
while the GPU has nothing queued. bench/trace_gaps.py names these stalls in a profile of DPO's step.

`unstalled(cls)` subclasses a trainer class so the same numbers come without those waits: the collator counts
the batch's tokens while it is still on the host (the count rides along in the batch and is taken out before the
model sees it), the parameter count is computed once per model, and the unwrapped model is remembered per model
object. Under several processes the counts need a gather across them, so there the Trainer's own code runs. The
NaN filter is switched off in the training arguments instead (`logging_nan_inf_filter=False`,
sitlib.training.common_args): a NaN loss is then logged as NaN.
"""
from __future__ import annotations

from typing import Optional

import torch


# False: unstalled() returns the class unchanged and the NaN filter stays on (the benchmark's "stalled" variant)
UNSTALLED = True

# the batch key that carries the count from the collator (host) to the step; popped before the model sees it
COUNT_KEY = "sit_tokens_seen"


def host_token_count(batch: dict, mode: str, main_input: str, pad_id: Optional[int]) -> int:
    """What transformers' Trainer adds to num_input_tokens_seen for `batch` ("all" or "non_padding"), counted
    while the batch is still on the host."""
    if mode == "non_padding" and "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if mode == "non_padding" and pad_id is not None:
        return int((batch[main_input] != pad_id).sum())
    return int(batch[main_input].numel())


def counting(collate, mode: str, main_input: str, pad_id: Optional[int]):
    """`collate` whose batches also carry their token count under COUNT_KEY."""
    def collate_and_count(features):
        batch = collate(features)
        if isinstance(batch, dict) and isinstance(batch.get(main_input), torch.Tensor):
            batch[COUNT_KEY] = host_token_count(batch, mode, main_input, pad_id)
        return batch

    return collate_and_count


def remembered_unwrap(unwrap):
    """accelerator.unwrap_model that returns the first answer again for the same model object. Only plain calls
    are remembered: keep_fp32_wrapper=False changes the model, so calls with arguments go through every time."""
    seen: dict = {}

    def unwrap_model(model, *args, **kwargs):
        if args or kwargs:
            return unwrap(model, *args, **kwargs)
        hit = seen.get(id(model))
        if hit is None or hit[0] is not model:
            hit = seen[id(model)] = (model, unwrap(model))
        return hit[1]

    unwrap_model.__wrapped__ = unwrap
    return unwrap_model


def unstalled(trainer_cls):
    """`trainer_cls` (a TRL or transformers trainer class) with the bookkeeping stalls above removed."""
    if not UNSTALLED:
        return trainer_cls

    class Unstalled(trainer_cls):
        _sit_params: Optional[tuple] = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.world_size == 1:
                self.accelerator.unwrap_model = remembered_unwrap(self.accelerator.unwrap_model)

        def get_train_dataloader(self):
            # one process: the collator counts the tokens on the host; several: the Trainer gathers its counts
            mode = self.args.include_num_input_tokens_seen
            if mode == "no" or self.args.world_size > 1:
                return super().get_train_dataloader()
            collate = self.data_collator
            self.data_collator = counting(collate, mode, getattr(self.model, "main_input_name", "input_ids"),
                                          getattr(self.processing_class, "pad_token_id", None))
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = collate

        def training_step(self, model, inputs, *args, **kwargs):
            count = inputs.pop(COUNT_KEY, None)   # not a model input
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                if count is not None:
                    inputs[COUNT_KEY] = count

        def _track_num_input_tokens(self, inputs) -> None:
            count = inputs.pop(COUNT_KEY, None)
            if count is None:
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += count

        def floating_point_ops(self, inputs) -> int:
            # transformers' formula; num_parameters walks every module and does not change while training
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._sit_params is None or self._sit_params[0] is not self.model:
                self._sit_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * self._sit_params[1]

    Unstalled.__name__ = Unstalled.__qualname__ = f"Unstalled{trainer_cls.__name__}"
    return Unstalled
