"""LoRA layers whose low-rank update is added inside the second GEMM: one `addmm` instead of PEFT's three kernels.

PEFT's LoRA Linear computes `result + lora_B(lora_A(dropout(x))) * scaling`: lora_B writes a full-size
[tokens, out_features] product, a `mul` scales it and an `add` adds it to the frozen layer's output, and backward
scales the full-size gradient once more. `torch.addmm(result, h, B.T, alpha=scaling)` does the scaling and the sum
in the GEMM's epilogue, and its backward scales only rank-r tensors. PEFT has no such path, so `fuse(model)` turns
each LoRA Linear into a `FusedLinear`, which takes it where nothing else is asked of the layer, and PEFT's own
forward everywhere else (adapters disabled or merged, per-row adapter names, DoRA and other variants, a bias on
lora_B, several active adapters, mixed dtypes, hooks on lora_B such as a sharding wrapper's). Switching adapters
(TRL's frozen "ref" copy for DPO) works as before: the forward reads the active adapter on every call.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

# the training builders fuse only where this is on (the benchmarks turn it off to measure PEFT's own forward)
FUSED = True
_FUSED_CLASS = None
_CLASS_LOCK = threading.Lock()


def fuse(model) -> int:
    """Make every LoRA Linear under `model` a FusedLinear (idempotent); returns how many layers are."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:   # subclasses (quantized layers) keep PEFT's forward
            module.__class__ = _fused_class()
    return fused(model)


def fused(model) -> int:
    """How many layers under `model` have the fused forward."""
    return sum(type(m) is _fused_class() for m in model.modules())


def unfuse(model) -> None:
    """PEFT's own layer class again wherever fuse() changed it."""
    for module in model.modules():
        if type(module) is _fused_class():
            module.__class__ = module.__class__.__bases__[0]


def _fused_class() -> type:
    """FusedLinear, built once on first use (PEFT is imported only by the code that trains); one class for every
    caller, so the layers pickle under one name."""
    global _FUSED_CLASS
    with _CLASS_LOCK:
        if _FUSED_CLASS is None:
            _FUSED_CLASS = _build_fused_class()
    return _FUSED_CLASS


def _build_fused_class() -> type:
    from peft.tuners.lora.layer import Linear

    class FusedLinear(Linear):
        """PEFT's LoRA Linear with the update added inside the second GEMM where that applies (module docstring);
        a subclass, so the layer still pickles, copies and reports itself as PEFT's."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = None if args or kwargs else _adapter(self, x)
            if name is None:
                return super().forward(x, *args, **kwargs)
            A, B = self.lora_A[name], self.lora_B[name]
            result = self.base_layer(x)
            h = A(self.lora_dropout[name](self._cast_input_dtype(x, A.weight.dtype)))
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.weight.t(),
                              alpha=self.scaling[name])
            return out.view(result.shape).to(result.dtype)

    FusedLinear.__module__ = __name__
    FusedLinear.__qualname__ = "FusedLinear"
    return FusedLinear


def __getattr__(name: str):
    if name == "FusedLinear":   # pickle finds the class by this name
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter(layer, x: torch.Tensor) -> Optional[str]:
    """The one active, vanilla LoRA adapter of `layer` when the fused path applies to this call, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    A, B = layer.lora_A[name], layer.lora_B[name]
    if name in getattr(layer, "lora_variant", {}) or B.bias is not None:
        return None
    if B._forward_hooks or B._forward_pre_hooks or B._backward_hooks or B._backward_pre_hooks:
        return None   # a wrapper (e.g. FSDP) or a hook must see lora_B called
    # one dtype for the sum (autocast gives every matmul its dtype), as PEFT's result + update would have
    one_dtype = x.dtype == A.weight.dtype == B.weight.dtype == layer.base_layer.weight.dtype
    return name if one_dtype or torch.is_autocast_enabled(x.device.type) else None
