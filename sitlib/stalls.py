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
object. Under several processes the counts need a gather across them, so there the Trainer's own counting runs.
Where the arguments ask for the NaN filter (`logging_nan_inf_filter`, transformers' default), the class turns the
Trainer's off and applies the same filter on the GPU: a micro-batch's non-finite loss is logged as the running
average instead, as transformers does.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch


# False: unstalled() returns the class unchanged (the benchmark's "stalled" variant)
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


class CountingCollator:
    """`collate` whose batches also carry their token count under COUNT_KEY (a class, not a closure: DataLoader
    workers started by spawn pickle their collate function)."""

    def __init__(self, collate, mode: str, main_input: str, pad_id: Optional[int]):
        self.collate, self.mode, self.main_input, self.pad_id = collate, mode, main_input, pad_id

    def __call__(self, features):
        batch = self.collate(features)
        if isinstance(batch, dict) and isinstance(batch.get(self.main_input), torch.Tensor):
            batch[COUNT_KEY] = host_token_count(batch, self.mode, self.main_input, self.pad_id)
        return batch


def remembered_unwrap(unwrap):
    """accelerator.unwrap_model that returns the first answer again for the same model object. Only plain calls
    are remembered: keep_fp32_wrapper=False changes the model, so calls with arguments go through every time.
    Models and answers are held weakly: a model the run drops is freed."""
    seen = weakref.WeakKeyDictionary()

    def unwrap_model(model, *args, **kwargs):
        if args or kwargs:
            return unwrap(model, *args, **kwargs)
        hit = seen.get(model)
        answer = hit() if hit is not None else None
        if answer is None:
            answer = unwrap(model)
            seen[model] = weakref.ref(answer)
        return answer

    unwrap_model.__wrapped__ = unwrap
    return unwrap_model


def nan_filtered(loss: torch.Tensor, trainer) -> torch.Tensor:
    """transformers' logging NaN filter computed on the GPU: a non-finite micro-batch loss counts as the average
    logged loss so far (what the Trainer adds in its place), without reading the loss back."""
    average = trainer._tr_loss / (1 + trainer.state.global_step - trainer._globalstep_last_logged)
    return torch.where(torch.isfinite(loss), loss, average)


def unstalled(trainer_cls):
    """`trainer_cls` (a TRL or transformers trainer class) with the bookkeeping stalls above removed."""
    if not UNSTALLED:
        return trainer_cls

    class Unstalled(trainer_cls):
        _flops_model, _flops_params = None, 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # the same filter, on the GPU (training_step); the Trainer's own reads every loss back
            self._nan_filter, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
            if self.args.world_size == 1:   # under DDP and the like the model is wrapped at train(): left as is
                self.accelerator.unwrap_model = remembered_unwrap(self.accelerator.unwrap_model)

        def get_train_dataloader(self):
            # one process: the collator counts the tokens on the host; several: the Trainer gathers its counts
            mode = self.args.include_num_input_tokens_seen
            if mode == "no" or self.args.world_size > 1:
                return super().get_train_dataloader()
            collate = self.data_collator
            self.data_collator = CountingCollator(collate, mode, getattr(self.model, "main_input_name", "input_ids"),
                                                  getattr(self.processing_class, "pad_token_id", None))
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = collate

        def training_step(self, model, inputs, *args, **kwargs):
            count = inputs.pop(COUNT_KEY, None)   # not a model input
            try:
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                if count is not None:
                    inputs[COUNT_KEY] = count
            return nan_filtered(loss, self) if self._nan_filter else loss

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
            if self._flops_model is not self.model:
                self._flops_model = self.model
                self._flops_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._flops_params

    Unstalled.__name__ = Unstalled.__qualname__ = f"Unstalled{trainer_cls.__name__}"
    return Unstalled
