"""Hugging Face login and an up-front access check for the hub models a stage loads. A token is only ever read
(from the Colab secret HF_TOKEN, the environment or a cached login) and handed to huggingface_hub: never printed,
logged or written into a config, metric or notebook."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

from .errors import HubAccessError

EMBEDDED = "embedded"
HUB = "https://huggingface.co"
# Families whose repos ask each user to accept a licence; used only to word the offline message (online, the hub
# itself says whether a repo is gated).
KNOWN_GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/")
ADD_TOKEN = ("add your token as the Colab secret HF_TOKEN (or the HF_TOKEN environment variable, or run "
             "`hf auth login`)")
ROLES = ("student", "teacher", "reward")
GUIDE = "docs/user_guide.md, 'Hugging Face login and gated models'"

_checked: set[str] = set()   # ids already checked in this process (each stage loads a model more than once)


def is_hub_id(name: str) -> bool:
    """A hub repo id ("org/name", or a legacy "name"), not the embedded model and not a local folder (those need
    no login). A path that does not exist is not a hub id either: deeper paths and ./, ~/, / prefixes."""
    return bool(name) and name != EMBEDDED and not Path(name).expanduser().exists() \
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")


def _colab_secret() -> Optional[str]:
    if "google.colab" not in sys.modules:
        return None
    try:
        from google.colab import userdata

        return userdata.get("HF_TOKEN") or None
    except Exception:   # secret absent, or notebook access not granted: fall through to the next source
        return None


def _cached_login() -> Optional[str]:
    from huggingface_hub import constants

    path = Path(constants.HF_TOKEN_PATH)
    return (path.read_text().strip() or None) if path.exists() else None


def find_token() -> tuple[Optional[str], str]:
    """(token, where it came from): the Colab secret, then the environment, then a cached login."""
    for source, get in (("Colab secret HF_TOKEN", _colab_secret),
                        ("environment", lambda: os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")),
                        ("cached login", _cached_login)):
        token = get()
        if token:
            return token.strip(), source
    return None, "none"


def _interactive_colab() -> bool:
    """The Colab notebook a person is looking at (not a papermill kernel, which would wait forever for a login)."""
    try:
        shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    except Exception:
        return False
    return "google.colab" in sys.modules and shell is not None and type(shell).__module__.startswith("google.colab")


def _offline_errors() -> tuple:
    from huggingface_hub.errors import OfflineModeIsEnabled

    kinds = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx", "requests"):   # whichever HTTP client this huggingface_hub uses
        try:
            m = __import__(mod)
            kinds.append(getattr(m, "TransportError", None) or getattr(m, "ConnectionError"))
        except (ImportError, AttributeError):
            pass
    return tuple(k for k in kinds if isinstance(k, type))


def _in_local_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def gated_message(model_id: str, token_source: str) -> str:
    page = f"{HUB}/{model_id}"
    if token_source == "none":
        return (f"{model_id} is gated and no Hugging Face token was found: accept its licence at {page}, then "
                f"{ADD_TOKEN}; or switch to an ungated model ({GUIDE})")
    return (f"{model_id} is gated and the token from the {token_source} has no access to it yet: accept its "
            f"licence at {page} (approval can take a while) with the account of that token; or switch to an "
            f"ungated model ({GUIDE})")


def offline_message(model_id: str) -> str:
    gated = any(model_id.startswith(p) for p in KNOWN_GATED_PREFIXES)
    return (f"{model_id}: the Hugging Face hub is unreachable (offline) and the model is not in the local cache; "
            f"connect to the internet" + (f" (it is gated: accept its licence at {HUB}/{model_id} and {ADD_TOKEN})"
                                          if gated else " (a gated model also needs the HF_TOKEN secret)")
            + ", or set the model to a local folder or 'embedded'")


def check_access(model_ids: Iterable[str], offer_login: bool = True) -> dict[str, str]:
    """Check that every hub id in model_ids can be downloaded; {id: "ok" | "cached" | "local"} or HubAccessError.

    Local folders and "embedded" are skipped. Offline, a model already in the local cache passes.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    result: dict[str, str] = {}
    token, source = find_token()
    for model_id in dict.fromkeys(model_ids):   # unique, in order
        if not is_hub_id(model_id):
            result[model_id] = "local"
            continue
        if model_id in _checked:
            result[model_id] = "ok"
            continue
        try:
            HfApi().auth_check(model_id, token=token or False)
        except GatedRepoError:
            if token is None and offer_login and _interactive_colab():
                return _login_then_check(model_ids)
            raise HubAccessError(gated_message(model_id, source)) from None
        except RepositoryNotFoundError:
            # the hub answers 401 for a gated repo when no token is sent, and for a missing or private one
            if token is None:
                if offer_login and _interactive_colab():
                    return _login_then_check(model_ids)
                raise HubAccessError(f"{model_id}: not found on the hub, or gated/private and needing a login: "
                                     f"check the id; if it is gated, accept its licence at {HUB}/{model_id} and "
                                     f"{ADD_TOKEN}") from None
            raise HubAccessError(f"{model_id}: no such model on the hub, or private to another account "
                                 f"(check the id in config.json 'models')") from None
        except _offline_errors():
            if _in_local_cache(model_id):
                _checked.add(model_id)
                result[model_id] = "cached"
                continue
            raise HubAccessError(offline_message(model_id)) from None
        _checked.add(model_id)
        result[model_id] = "ok"
    return result


def _login_then_check(model_ids: Iterable[str]) -> dict[str, str]:
    """Colab without a token: show the hub's login box (it waits for the user), then check once more."""
    from huggingface_hub import notebook_login

    print("A Hugging Face login is needed for a gated model: log in below (or add the Colab secret HF_TOKEN).")
    notebook_login()
    return check_access(model_ids, offer_login=False)


def configured_models(config, roles: Iterable[str] = ROLES) -> list[str]:
    """The configured model ids of these roles; the reward model only when the scorer uses it."""
    out = []
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "reward" and config.models.scorer != "reward_model":
            continue
        out.append(getattr(config.models, role))
    return out


def require_models(session, roles: Iterable[str] = ROLES) -> dict[str, str]:
    """The up-front check of a stage: every configured hub model it needs is reachable with the token found."""
    return check_access(configured_models(session.config, roles))


def login_status() -> str:
    """One line for the set-up cell: where the token comes from (never the token)."""
    _, source = find_token()
    return "Hugging Face login: " + ("none (public and local models only)" if source == "none" else source)
