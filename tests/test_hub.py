"""Hub access checks with the hub's answers simulated through huggingface_hub's own error mapping: gated (401/403),
missing, offline, ok; where the token comes from; the token never appears in a message or the output tree."""
import importlib
import json
import sys
import types

import pytest

from sitlib import hub
from sitlib.errors import HubAccessError

GATED = "meta-llama/Llama-3.2-3B"
FAKE_TOKEN = "hf_fakeTOKEN0123456789abcdefSECRET"
http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")


def hub_answers(monkeypatch, status=None, error_code=None, exc=None):
    """Replace the network call of HfApi.auth_check; record the token it was given."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import hf_raise_for_status

    calls = []

    def auth_check(self, repo_id, *, token=None, **kw):
        calls.append((repo_id, token))
        if exc is not None:
            raise exc
        if status is not None:
            url = f"https://huggingface.co/api/models/{repo_id}/auth-check"
            headers = {"X-Error-Code": error_code} if error_code else {}
            hf_raise_for_status(http.Response(status, headers=headers, request=http.Request("GET", url)))
    monkeypatch.setattr(HfApi, "auth_check", auth_check)
    return calls


@pytest.fixture(autouse=True)
def no_login(monkeypatch, tmp_path):
    """No token from this machine's environment or login, and a fresh per-process cache of checked ids."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub, "_checked", set())
    monkeypatch.setattr(hub, "_in_local_cache", lambda model_id: False)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("status,code", [(401, "GatedRepo"), (403, "GatedRepo"), (401, "RepoNotFound"), (401, None)])
def test_gated_without_token(monkeypatch, status, code):
    calls = hub_answers(monkeypatch, status, code)
    with pytest.raises(HubAccessError) as e:
        hub.check_access([GATED])
    msg = one_line(e)
    assert GATED in msg and "gated" in msg and "HF_TOKEN" in msg
    assert f"https://huggingface.co/{GATED}" in msg
    assert calls == [(GATED, False)]   # no token was sent


def test_gated_with_a_token_that_has_no_access(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = hub_answers(monkeypatch, 403, "GatedRepo")
    with pytest.raises(HubAccessError) as e:
        hub.check_access([GATED])
    msg = one_line(e)
    assert "environment" in msg and "has no access" in msg and GATED in msg
    assert FAKE_TOKEN not in msg
    assert calls == [(GATED, FAKE_TOKEN)]


def test_missing_model_with_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub_answers(monkeypatch, 404, "RepoNotFound")
    with pytest.raises(HubAccessError, match="no such model"):
        hub.check_access(["someone/does-not-exist"])


def test_offline_names_the_model_and_the_token(monkeypatch):
    hub_answers(monkeypatch, exc=http.ConnectError("[Errno -2] Name or service not known"))
    with pytest.raises(HubAccessError) as e:
        hub.check_access(["OpenAssistant/reward-model-deberta-v3-large-v2", GATED])
    msg = one_line(e)
    assert "offline" in msg and "OpenAssistant/reward-model-deberta-v3-large-v2" in msg and "HF_TOKEN" in msg
    from huggingface_hub.errors import OfflineModeIsEnabled

    hub_answers(monkeypatch, exc=OfflineModeIsEnabled("HF_HUB_OFFLINE is set"))
    with pytest.raises(HubAccessError) as e:
        hub.check_access([GATED])
    msg = one_line(e)
    assert "offline" in msg and GATED in msg and "it is gated" in msg and "HF_TOKEN" in msg


def test_offline_with_the_model_cached_passes(monkeypatch):
    hub_answers(monkeypatch, exc=http.ConnectError("no network"))
    monkeypatch.setattr(hub, "_in_local_cache", lambda model_id: model_id == GATED)
    assert hub.check_access([GATED]) == {GATED: "cached"}


def test_ok_once_per_process_and_local_models_skip_the_hub(monkeypatch, tmp_path):
    calls = hub_answers(monkeypatch)
    assert hub.check_access([GATED, "embedded", str(tmp_path), GATED]) == {
        GATED: "ok", "embedded": "local", str(tmp_path): "local"}
    hub.check_access([GATED])
    assert calls == [(GATED, False)]


def test_what_counts_as_a_hub_id(tmp_path):
    assert hub.is_hub_id(GATED) and hub.is_hub_id("gpt2")
    for local in ("embedded", str(tmp_path), str(tmp_path / "missing"), "./missing", "~/missing", "a/b/c", ""):
        assert not hub.is_hub_id(local), local


def test_token_sources_in_order(monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert hub.find_token() == (None, "none")
    (tmp_path / "cached").write_text("hf_cached\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "cached"))
    assert hub.find_token() == ("hf_cached", "cached login")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert hub.find_token() == ("hf_env", "environment")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda key: "hf_colab" if key == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert hub.find_token() == ("hf_colab", "Colab secret HF_TOKEN")
    assert "hf_colab" not in hub.login_status() and "Colab secret" in hub.login_status()


def test_configured_models_skip_the_reward_model_when_unused():
    from sitlib.config import Config

    cfg = Config()
    assert hub.configured_models(cfg) == [cfg.models.student, cfg.models.teacher, cfg.models.reward]
    cfg.models.scorer = "offline"
    assert hub.configured_models(cfg, ["student", "reward"]) == [cfg.models.student]


def test_loading_a_gated_model_fails_before_any_download(monkeypatch):
    from sitlib import models

    hub_answers(monkeypatch, 401, "GatedRepo")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(HubAccessError, match="Llama-3.2-3B"):
        models.load_tokenizer(GATED)


def test_setup_stage_checks_every_configured_model(monkeypatch, tmp_path):
    """What `python -m sitlib setup --profile cpu -p models.student=meta-llama/Llama-3.2-3B` raises offline."""
    from sitlib import session

    hub_answers(monkeypatch, exc=http.ConnectError("no network"))
    s = session.setup("cpu", tmp_path / "out", overrides={"models.student": GATED}, verbose=False)
    with pytest.raises(HubAccessError) as e:
        session.check_student(s)
    msg = one_line(e)
    assert GATED in msg and "HF_TOKEN" in msg
    assert not (tmp_path / "out" / "evaluation" / "metrics" / "setup.json").exists()


def test_token_is_written_nowhere(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """01's check with a token in the environment: no file of the output tree and no printed line holds it."""
    from sitlib import session

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub_answers(monkeypatch)
    s = session.setup("cpu", tmp_path / "out", overrides={"models.student": str(tiny_model_dir)})
    session.check_student(s, max_new_tokens=4)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "setup.json" for p in files)
    assert json.loads((tmp_path / "out" / "evaluation" / "metrics" / "setup.json").read_text())["student"]
    for p in files:
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p
    assert FAKE_TOKEN not in capsys.readouterr().out


@pytest.mark.slow
def test_cli_setup_with_a_gated_student_offline_is_one_line(tmp_path):
    """`python -m sitlib setup --profile cpu -p models.student=meta-llama/Llama-3.2-3B` with no hub reachable."""
    import os
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))   # no network, no cached login or model
    r = subprocess.run([sys.executable, "-m", "sitlib", "setup", "--profile", "cpu", "-p", f"models.student={GATED}",
                        "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parent.parent, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("error:") and GATED in last and "HF_TOKEN" in last and "offline" in last
