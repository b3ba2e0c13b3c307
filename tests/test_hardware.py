"""Profile choice from compute capability and memory (never from is_bf16_supported), fit checks, emulation,
measured stage costs and precision flags."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from sitlib import hardware
from sitlib.errors import ConfigError, ProfileError


def fake_gpu(monkeypatch, major, minor, gib=16.0, name="GPU"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(major=major, minor=minor, name=name, total_memory=int(gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports


@pytest.mark.parametrize("card,cc,gb,profile", [
    ("T4", (7, 5), 15, "t4"), ("T4 as reported", (7, 5), 14.7, "t4"),
    ("L4", (8, 9), 22.5, "l4"),
    ("A100 40GB", (8, 0), 40, "a100-40gb"), ("A100 40GB as reported", (8, 0), 39.4, "a100-40gb"),
    ("A100 80GB", (8, 0), 80, "a100-80gb"),
    ("H100", (9, 0), 80, "h100"), ("H200", (9, 0), 141, "h100"),
    ("no GPU", None, 0, "cpu"),
])
def test_profile_for(card, cc, gb, profile):
    assert hardware.profile_for(cc, gb) == profile, card


def test_every_gpu_profile_is_reachable_and_sized():
    for name, gb in hardware.GPU_CARDS_GB.items():
        assert hardware.PROFILES[name].min_memory_gb == gb
    assert {hardware.profile_for(cc, gb) for cc, gb in [((7, 5), 15), ((8, 9), 22.5), ((8, 0), 40), ((8, 0), 80),
                                                         ((9, 0), 80)]} == set(hardware.GPU_CARDS_GB)


@pytest.mark.parametrize("cc,gib,profile", [((7, 5), 14.7, "t4"), ((8, 9), 22.0, "l4"), ((8, 0), 39.4, "a100-40gb"),
                                            ((8, 0), 79.2, "a100-80gb"), ((9, 0), 79.1, "h100")])
def test_auto_picks_by_capability_and_memory(monkeypatch, cc, gib, profile):
    fake_gpu(monkeypatch, *cc, gib=gib)
    prof, det = hardware.get_profile("auto")
    assert prof.name == profile and det.compute_capability == cc
    assert prof.bf16 == (cc >= (8, 0))
    assert prof.fp16 == (cc < (8, 0))


@pytest.mark.parametrize("gib,resolved", [(39.4, "a100-40gb"), (79.2, "a100-80gb")])
def test_a100_alias_resolves_by_memory(monkeypatch, gib, resolved):
    fake_gpu(monkeypatch, 8, 0, gib=gib)
    assert hardware.get_profile("a100")[0].name == resolved


def test_hand_chosen_profile_too_big_for_the_card(monkeypatch):
    fake_gpu(monkeypatch, 8, 0, gib=39.4)
    with pytest.raises(ProfileError) as e:
        hardware.get_profile("h100")
    msg = str(e.value)
    assert "\n" not in msg and "39.4 GB" in msg and "'a100-40gb'" in msg
    assert hardware.get_profile("t4")[0].name == "t4"   # a smaller profile on a bigger card is fine


def test_emulated_card(monkeypatch):
    fake_gpu(monkeypatch, 9, 0, gib=139.8, name="NVIDIA H200")
    monkeypatch.setenv(hardware.EMULATE_ENV, "22.5")
    prof, det = hardware.get_profile("auto")
    assert prof.name == "l4" and det.emulated and det.memory_gb == 22.5 and det.device_memory_gb == pytest.approx(139.8)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (130 * 2**30, int(139.8 * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 20 * 2**30)
    hardware.apply_memory_limit(det)
    assert calls == [(pytest.approx(22.5 / 139.8), 0)]
    assert torch.cuda.mem_get_info() == (int(2.5 * 2**30), int(22.5 * 2**30))   # what a 22.5 GB card has left
    monkeypatch.setenv(hardware.EMULATE_ENV, "200")
    with pytest.raises(ConfigError, match="more than this card"):
        hardware.detect()
    monkeypatch.setenv(hardware.EMULATE_ENV, "lots")
    with pytest.raises(ConfigError, match=hardware.EMULATE_ENV):
        hardware.detect()


def test_no_limit_without_emulation(monkeypatch):
    fake_gpu(monkeypatch, 9, 0, gib=79.1)
    monkeypatch.delenv(hardware.EMULATE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: pytest.fail("limited"))
    det = hardware.detect()
    assert not det.emulated
    hardware.apply_memory_limit(det)


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prof, det = hardware.get_profile("auto")
    assert prof.name == "cpu" and prof.dtype == "float32" and not prof.gradient_checkpointing
    assert prof.overrides["models.student"] == "embedded"


def test_gpu_profile_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProfileError, match="needs a CUDA GPU"):
        hardware.get_profile("a100")
    with pytest.raises(ConfigError, match="unknown profile 'v100'"):
        hardware.get_profile("v100")


def test_weights_key_changes_exactly_with_dtype_4bit_and_adapter_dtype():
    P = hardware.PROFILES
    assert P["a100-80gb"].weights_key == P["h100"].weights_key == P["a100-40gb"].weights_key == "bfloat16-bf16-adapters"
    assert P["t4"].weights_key == "float16-4bit" and P["cpu"].weights_key == "float32"
    assert P["l4"].weights_key == "bfloat16-bf16-adapters"   # only its teacher is 4-bit; the student trains in bf16
    assert replace(P["h100"], bf16_adapters=False).weights_key == "bfloat16"
    assert replace(P["cpu"], bf16_adapters=True).weights_key == "float32"   # not a bf16 base: adapters stay fp32
    assert P["l4"].teacher_in_4bit and not P["l4"].load_in_4bit


def test_varlen_attention_only_on_bf16_padding_free_profiles():
    for p in hardware.PROFILES.values():
        assert p.attn_implementation == ("sit_varlen" if p.bf16 and p.padding_free else "sdpa"), p.name


def test_80gb_cards_do_not_give_up_speed():
    for name in ("a100-80gb", "h100"):
        p = hardware.PROFILES[name]
        assert not p.load_in_4bit and not p.teacher_in_4bit and not p.gradient_checkpointing and p.bf16


def test_stage_costs_reads_measured_files_only(tmp_path):
    assert hardware.stage_costs("sft", tmp_path) == []
    assert "nothing measured" in hardware.describe_stage_costs("sft", tmp_path)
    (tmp_path / "memory_NVIDIA_H200.json").write_text(json.dumps({"device": "NVIDIA H200", "profiles": {
        "l4": {"card_gb": 22.5, "stages": {"sft": {"peak_gb": 17.25, "ok": True},
                                           "dpo": {"peak_gb": 19.0, "ok": True}}},
        "t4": {"card_gb": 15, "stages": {"dpo": {"peak_gb": 9.0, "ok": True}}}}}))
    (tmp_path / "2026-11-29_NVIDIA_L4.json").write_text(json.dumps({"device": "NVIDIA L4", "series": {
        "model": "embedded SmolLM2-135M-Instruct", "profile": "l4", "stages": {"05": 600.0, "06": 60.0}}}))
    (tmp_path / "2026-11-29_other.json").write_text(json.dumps({"device": "x", "generation": {"tokens": 1}}))
    rows = hardware.stage_costs("sft", tmp_path)
    assert [(r["profile"], r["peak_gb"], r["seconds"]) for r in rows] == [("l4", 17.25, None), ("l4", None, 600.0)]
    assert hardware.stage_costs("05", tmp_path) == rows                 # by notebook number too
    assert hardware.stage_costs("benchmark", tmp_path) == []
    text = hardware.describe_stage_costs("sft", tmp_path)
    assert "peak 17.2 GB of its 22.5 GB card" in text
    assert "10.0 min on an NVIDIA L4 with embedded SmolLM2-135M-Instruct" in text


def test_set_precision_follows_profile():
    hardware.set_precision(hardware.PROFILES["h100"])
    assert torch.backends.cuda.matmul.allow_tf32
    hardware.set_precision(hardware.PROFILES["cpu"])
    assert not torch.backends.cuda.matmul.allow_tf32


def varlen_measured_lighter() -> bool:
    """The throughput benchmark ran SFT under the h100 settings with sit_varlen ("sitlib") and with SDPA
    ("sitlib_plain") in one run: sit_varlen must have peaked lower for it to stand in for SDPA's measurement."""
    for f in sorted(hardware.RESULTS_DIR.glob("20*_*.json")):
        sft = json.loads(f.read_text()).get("sft", {})
        if "sitlib" in sft and "sitlib_plain" in sft:
            return sft["sitlib"]["peak_gb"] <= sft["sitlib_plain"]["peak_gb"]
    return False


def test_committed_memory_measurements_cover_every_profile_as_configured():
    """bench/results/memory_*.json: every stage of every GPU profile measured at <= 90% of its card, with the
    settings the profiles have now (a profile changed without measuring again fails here)."""
    from sitlib.config import load_config

    files = sorted(hardware.RESULTS_DIR.glob("memory_*.json"))
    assert files, "no memory measurements committed (bench/bench_memory.py writes them)"
    data = json.loads(files[-1].read_text())
    for name, card in hardware.GPU_CARDS_GB.items():
        entry, prof = data["profiles"][name], hardware.PROFILES[name]
        assert entry["card_gb"] == card
        assert set(entry["stages"]) == {"generate", "preference", "sft", "prompt_tuning", "dpo", "benchmark"}
        for stage, m in entry["stages"].items():
            assert m["ok"] and m["peak_gb"] <= 0.9 * card, (name, stage, m)
        cfg, s = load_config(None, prof.overrides), entry["settings"]
        assert (s["dtype"], s["student_4bit"], s["teacher_4bit"], s["gradient_checkpointing"]) == (
            prof.dtype, prof.load_in_4bit, prof.teacher_in_4bit, prof.gradient_checkpointing), name
        # measured under SDPA; sit_varlen replaces it only for training and only where it was measured lighter
        assert s["attn_implementation"] in {prof.attn_implementation, "sdpa"}, name
        if prof.attn_implementation == "sit_varlen":
            assert varlen_measured_lighter(), name
        assert s.get("sft_pack_tokens", 0) == cfg.sft.pack_tokens, name   # packed SFT: tokens per sequence
        assert (s["sft"], s["dpo"], s["prompt_tuning"]) == tuple(
            f"{sec.batch_size}x{sec.gradient_accumulation}" for sec in (cfg.sft, cfg.dpo, cfg.prompt_tuning)), name
        assert (s["generation_batch"], s["preference_batch"], s["evaluation_batch"], s["max_seq_length"]) == (
            cfg.generation.batch_size, cfg.preference.batch_size, cfg.evaluation.batch_size,
            cfg.models.max_seq_length), name
    # one memory measurement per profile (a timed series run adds rows with seconds, not peaks)
    peaks = [r["profile"] for r in hardware.stage_costs("dpo") if r["peak_gb"] is not None]
    assert peaks == list(hardware.GPU_CARDS_GB)
