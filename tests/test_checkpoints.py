"""Resume picks the newest complete checkpoint; foreign or stale checkpoints never get resumed."""
import json

from sitlib.checkpoints import is_complete, prepare_checkpoints, tokens_seen


def _ckpt(root, step, state=True, weights=True, tokens=0):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if weights:
        (d / "adapter_model.safetensors").write_bytes(b"w")
    if state:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": tokens}))
    return d


def test_incomplete_newest_checkpoint_is_skipped_and_removed(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    prepare_checkpoints(ck, "fp1", "float32")
    _ckpt(ck, 4)
    _ckpt(ck, 8, state=False)                        # killed before trainer_state.json was written
    assert prepare_checkpoints(ck, "fp1", "float32") == str(ck / "checkpoint-4")
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint-8" in out and "resuming from checkpoint-4" in out
    assert not (ck / "checkpoint-8").exists()


def test_half_written_trainer_state_or_missing_weights_is_incomplete(tmp_path):
    d = _ckpt(tmp_path, 3)
    (d / "trainer_state.json").write_text('{"global_step": 3, "log_hi')
    assert not is_complete(d)
    assert not is_complete(_ckpt(tmp_path, 5, weights=False))
    assert is_complete(_ckpt(tmp_path, 7))


def test_checkpoints_of_other_weights_are_moved_aside_not_resumed(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    prepare_checkpoints(ck, "fp1", "float16-4bit")
    _ckpt(ck, 4)
    assert prepare_checkpoints(ck, "fp1", "bfloat16") is None
    assert "written with float16-4bit weights" in capsys.readouterr().out
    aside = tmp_path / "checkpoints-float16-4bit"
    assert (aside / "checkpoint-4" / "trainer_state.json").exists()
    assert json.loads((ck / "fingerprint.json").read_text()) == {"fingerprint": "fp1", "weights_key": "bfloat16"}
    assert not any(p.name.startswith("checkpoint-") for p in ck.iterdir())


def test_same_weights_resume_and_other_fingerprint_is_stale(tmp_path):
    ck = tmp_path / "checkpoints"
    prepare_checkpoints(ck, "fp1", "bfloat16")
    _ckpt(ck, 4, tokens=123)
    last = prepare_checkpoints(ck, "fp1", "bfloat16")
    assert last == str(ck / "checkpoint-4") and tokens_seen(last) == 123
    assert prepare_checkpoints(ck, "fp2", "bfloat16") is None
    assert not (ck / "checkpoint-4").exists() and tokens_seen(None) == 0
