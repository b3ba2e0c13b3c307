"""sitlib.lora: the fused LoRA forward equals PEFT's (outputs and gradients), follows adapter switches, and steps
aside wherever PEFT's own forward is needed."""
from types import SimpleNamespace

import pytest
import torch

from sitlib import lora, training

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(path, dtype=torch.float32, **lora_kw):
    """Two adapters ("default" active, "ref") with random updates; in `dtype` throughout, as the bf16 profiles
    keep their adapters (PEFT would upcast them to float32, and the fused path needs one dtype)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=MODULES, task_type="CAUSAL_LM") | lora_kw
    model = get_peft_model(base, LoraConfig(**cfg), autocast_adapter_dtype=False)
    model.add_adapter("ref", LoraConfig(**cfg), autocast_adapter_dtype=False)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():   # lora_B starts at zero: give every update a value
        if "lora_" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.2).to(p.dtype)
    return model


def _ids(n=2, t=9):
    return torch.randint(3, 60, (n, t), generator=torch.Generator().manual_seed(1))


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_fused_forward_and_gradients_equal_pefts(tiny_model_dir):
    model, ids = _peft_model(tiny_model_dir), _ids()
    want, want_grads = _logits_and_grads(model, ids)
    assert lora.fuse(model) == 2 * len(MODULES)
    got, got_grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and any("lora_B" in n for n in got_grads)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad(), model.disable_adapter():   # the update is not negligible: a wrong one would show
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-2


def test_the_fused_forward_is_taken_and_reads_the_active_adapter(tiny_model_dir, monkeypatch):
    from peft.tuners.lora.layer import Linear

    model, ids = _peft_model(tiny_model_dir), _ids()
    with torch.no_grad():
        want = {"default": model(input_ids=ids).logits}
        model.set_adapter("ref")
        want["ref"] = model(input_ids=ids).logits
        model.set_adapter("default")
    assert not torch.allclose(want["default"], want["ref"])   # the two adapters differ: the switch is visible
    lora.fuse(model)
    calls = []   # PEFT's forward, reached through super() where the fused path does not apply
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or pytest.fail("PEFT's forward"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want["default"], rtol=1e-5, atol=1e-5)
        model.set_adapter("ref")
        torch.testing.assert_close(model(input_ids=ids).logits, want["ref"], rtol=1e-5, atol=1e-5)
    assert not calls


def test_peft_keeps_its_forward_where_the_fused_one_does_not_apply(tiny_model_dir):
    model, ids = _peft_model(tiny_model_dir), _ids()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        lora.fuse(model)
        with model.disable_adapter():   # disabled adapters: the base layer alone, as PEFT computes it
            torch.testing.assert_close(model(input_ids=ids).logits, off)
    dora = _peft_model(tiny_model_dir, use_dora=True)
    with torch.no_grad():
        want = dora(input_ids=ids).logits
        lora.fuse(dora)
        torch.testing.assert_close(dora(input_ids=ids).logits, want)   # DoRA: PEFT's variant forward
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    x = torch.randn(3, layer.in_features)
    assert lora._adapter(layer, x.double()) is None   # mixed dtypes without autocast: PEFT's arithmetic
    assert lora._adapter(layer, x) == "default"


def test_fuse_is_idempotent_and_unfuse_restores_pefts_class(tiny_model_dir):
    from peft.tuners.lora.layer import Linear

    model = _peft_model(tiny_model_dir)
    assert lora.fuse(model) == lora.fuse(model) == lora.fused(model) == 14
    assert all(isinstance(m, Linear) for m in model.modules() if type(m).__name__ == "FusedLinear")
    lora.unfuse(model)
    assert lora.fused(model) == 0 and sum(type(m) is Linear for m in model.modules()) == 14


def test_training_fuses_lora_on_a_gpu_only(tiny_model_dir, monkeypatch):
    model = _peft_model(tiny_model_dir)
    assert training.fuse_lora(model, SimpleNamespace(use_cpu=True)) == 0
    monkeypatch.setattr(lora, "FUSED", False)
    assert training.fuse_lora(model, SimpleNamespace(use_cpu=False)) == 0
    monkeypatch.setattr(lora, "FUSED", True)
    assert training.fuse_lora(model, SimpleNamespace(use_cpu=False)) == 14 == lora.fused(model)


def _same_with_and_without_fusing(model, run):
    """run(model) before and after fuse(), the outputs compared."""
    with torch.no_grad():
        want = run(model)
        lora.fuse(model)
        torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)


def test_merged_several_active_and_per_row_adapters_keep_pefts_arithmetic(tiny_model_dir):
    ids = _ids()
    merged = _peft_model(tiny_model_dir)
    merged.merge_adapter()   # the update is in the base weights: adding it again would count it twice
    _same_with_and_without_fusing(merged, lambda m: m(input_ids=ids).logits)
    both = _peft_model(tiny_model_dir)
    both.base_model.set_adapter(["default", "ref"])
    _same_with_and_without_fusing(both, lambda m: m(input_ids=ids).logits)
    rows = _peft_model(tiny_model_dir).eval()
    _same_with_and_without_fusing(rows, lambda m: m(input_ids=ids, adapter_names=["default", "ref"]).logits)


def test_a_bias_on_lora_b_and_dropout_in_training_match_peft(tiny_model_dir):
    ids = _ids()
    _same_with_and_without_fusing(_peft_model(tiny_model_dir, lora_bias=True), lambda m: m(input_ids=ids).logits)
    dropped = _peft_model(tiny_model_dir, lora_dropout=0.3).train()

    def seeded(m):
        torch.manual_seed(3)
        return m(input_ids=ids).logits
    _same_with_and_without_fusing(dropped, seeded)


def test_autocast_bf16_on_the_cpu_is_as_close_to_float32_as_peft(tiny_model_dir):
    model, ids = _peft_model(tiny_model_dir), _ids()
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_err = (model(input_ids=ids).logits.float() - exact).abs().max()
            lora.fuse(model)
            layer = next(m for m in model.modules() if type(m).__name__ == "FusedLinear")
            assert lora._adapter(layer, torch.randn(2, layer.in_features, dtype=torch.bfloat16)) == "default"
            fused_err = (model(input_ids=ids).logits.float() - exact).abs().max()
    assert 0 < fused_err <= 2 * peft_err   # bf16 rounding, not a wrong update (which would be far larger)


def test_a_fused_model_pickles_and_copies(tiny_model_dir):
    import copy
    import pickle

    model, ids = _peft_model(tiny_model_dir), _ids()
    lora.fuse(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert lora.fused(other) == 14
            torch.testing.assert_close(other(input_ids=ids).logits, want)
        layer = next(m for m in model.modules() if type(m).__name__ == "FusedLinear")
        shallow = copy.copy(layer)
        x = torch.randn(2, layer.in_features)
        before = layer(x)
        shallow._disable_adapters = True   # its own state, not the original layer's
        torch.testing.assert_close(shallow(x), layer.base_layer(x))
        assert not layer.disable_adapters and torch.equal(layer(x), before)


def test_hooks_on_lora_b_get_pefts_forward(tiny_model_dir):
    model, ids = _peft_model(tiny_model_dir), _ids()
    lora.fuse(model)
    calls = []
    for m in model.modules():
        if type(m).__name__ == "FusedLinear":
            m.lora_B["default"].register_forward_pre_hook(lambda mod, args: calls.append(1))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 14   # every lora_B called as a module: a wrapper's hooks run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_bf16_on_a_gpu_stays_within_rounding_of_pefts(tiny_model_dir):
    """In bf16 the two forwards round differently (one GEMM epilogue against a product, a scale and an add), so
    both are held against the same weights in float32: the fused error may not exceed twice PEFT's own."""
    import copy

    model, ids = _peft_model(tiny_model_dir, dtype=torch.bfloat16).cuda(), _ids().cuda()
    exact, exact_grads = _logits_and_grads(copy.deepcopy(model).float(), ids)
    want, want_grads = _logits_and_grads(model, ids)
    lora.fuse(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "FusedLinear")
    assert lora._adapter(layer, torch.randn(2, layer.in_features, dtype=torch.bfloat16, device="cuda")) == "default"
    got, got_grads = _logits_and_grads(model, ids)

    def err(a, b):
        return (a.float() - b.float()).norm().item()

    assert err(got, exact) <= 2 * err(want, exact) + 1e-3 * exact.norm().item()
    assert got_grads.keys() == want_grads.keys() == exact_grads.keys()
    for n in exact_grads:
        e = exact_grads[n]
        assert err(got_grads[n], e) <= 2 * err(want_grads[n], e) + 1e-3 * e.float().norm().item(), n


def test_a_fused_model_generates_what_pefts_forward_generates(tiny_model_dir):
    from sitlib.generation import Sampling, chat_input_ids, generate
    from sitlib.models import load_tokenizer

    model, tok = _peft_model(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))
    inputs = chat_input_ids(tok, [[{"role": "user", "content": p}] for p in ("Name a colour.", "Count to three.")])
    want = [c.text for c in generate(model, tok, inputs, Sampling.greedy(8))]
    lora.fuse(model)
    assert [c.text for c in generate(model, tok, inputs, Sampling.greedy(8))] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_fused_bf16_model_generates_on_a_gpu_as_pefts(tiny_model_dir):
    from sitlib.generation import Sampling, chat_input_ids, generate
    from sitlib.models import load_tokenizer

    model, tok = _peft_model(tiny_model_dir, dtype=torch.bfloat16).cuda().eval(), load_tokenizer(str(tiny_model_dir))
    inputs = chat_input_ids(tok, [[{"role": "user", "content": f"Say {i}."}] for i in range(6)])
    want = [c.text for c in generate(model, tok, inputs, Sampling.greedy(12))]
    lora.fuse(model)   # the pool's static steps and CUDA graphs now run the fused layers
    layer = next(m for m in model.modules() if type(m).__name__ == "FusedLinear")
    assert lora._adapter(layer, torch.randn(2, layer.in_features, dtype=torch.bfloat16, device="cuda")) == "default"
    got = [c.text for c in generate(model, tok, inputs, Sampling.greedy(12))]
    assert sum(g == w for g, w in zip(got, want)) >= len(want) - 1   # bf16: a near tie may flip one greedy row
