"""LoRA layers whose low-rank update is added inside the second GEMM: one `addmm` instead of PEFT's three kernels.

PEFT's LoRA Linear computes `result + lora_B(lora_A(dropout(x))) * scaling`: lora_B writes a full-size
[tokens, out_features] product, a `mul` scales it and an `add` adds it to the frozen layer's output, and backward
runs the same two elementwise passes again. `torch.addmm(result, h, B.T, alpha=scaling)` does the scaling and the
sum in the GEMM's epilogue, and its backward scales only the rank-r tensors. PEFT has no such path, so `fuse(model)`
gives each LoRA Linear a forward that takes it where nothing else is asked of the layer, and PEFT's own forward
everywhere else (adapters disabled or merged, per-row adapter names, DoRA and other variants, a bias on lora_B,
several active adapters, mixed dtypes). Switching adapters (TRL's frozen "ref" copy for DPO) works as before: the
fused forward reads the active adapter on every call.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

# the training builders fuse only where this is on (the benchmarks turn it off to measure PEFT's own forward)
FUSED = True


def fuse(model) -> int:
    """Give every LoRA Linear under `model` the fused forward (idempotent); returns how many layers have it."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        # subclasses (quantized layers) keep PEFT's forward, and so does a layer whose forward a hook already wraps
        if type(module) is Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
    return fused(model)


def fused(model) -> int:
    """How many layers under `model` have the fused forward."""
    return sum(getattr(vars(m).get("forward"), "__func__", None) is _forward for m in model.modules())


def unfuse(model) -> None:
    """PEFT's own forward again on every layer fuse() changed."""
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is _forward:
            del module.forward


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
    # one dtype for the sum (autocast gives every matmul its dtype), as PEFT's result + update would have
    one_dtype = x.dtype == A.weight.dtype == B.weight.dtype == layer.base_layer.weight.dtype
    return name if one_dtype or torch.is_autocast_enabled(x.device.type) else None


def _forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _adapter(layer, x)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    A, B = layer.lora_A[name], layer.lora_B[name]
    result = layer.base_layer(x)
    h = A(layer.lora_dropout[name](layer._cast_input_dtype(x, A.weight.dtype)))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.weight.t(),
                      alpha=layer.scaling[name])
    return out.view(result.shape).to(result.dtype)
