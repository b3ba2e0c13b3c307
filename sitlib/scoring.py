"""Response scorers for preference pairs: the OpenAssistant reward model (GPU) or an offline scorer (CPU)."""
from __future__ import annotations

from typing import Protocol

import torch

from .errors import ConfigError
from .filtering import quality_score


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]: ...


# (prompt, answer) pairs the reward model scores at once. preference.batch_size caps the generation pool, whose
# rows are sized by free memory; the reward model's attention grows with the square of a pair's length, and at
# 1,024 pairs of 768 tokens it ran out of memory on an emulated 80 GB card
# (bench/results/oom_reward_batch_1024_NVIDIA_H200.json)
REWARD_BATCH = 64


class RewardModelScorer:
    """OpenAssistant/reward-model-deberta-v3-large-v2: a logit for (question, answer); higher is better."""

    name = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def score(self, prompts, responses, ended):
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tok(prompts[i:i + self.batch_size], responses[i:i + self.batch_size], padding=True,
                           truncation=True, max_length=1024, return_tensors="pt").to(dev)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return out


class OfflineScorer:
    """Needs no download. score = quality + 0.25 · mean token log-prob of the response under the model it is
    given (04 passes the model that wrote the candidates) − 1 if the response was cut off at the token limit.

    quality is the filter's content score in [0, 1] (length adequacy, lexical variety as MATTR, request/answer
    shape); the log-prob term prefers fluent text the model finds likely; the cut-off penalty makes a finished
    answer beat an unfinished one (04 never picks a cut-off answer as chosen in any case). It measures form and
    fluency, not truth: a coarse stand-in for a reward model.
    """

    name = "offline"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def mean_logprobs(self, prompts: list[str], responses: list[str]) -> list[float]:
        from .generation import chat_input_ids

        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(prompts), self.batch_size):
            ps = chat_input_ids(self.tok, [[{"role": "user", "content": p}] for p in prompts[i:i + self.batch_size]])
            rs = [self.tok(r, add_special_tokens=False)["input_ids"] or [self.tok.eos_token_id]
                  for r in responses[i:i + self.batch_size]]
            seqs = [p + r for p, r in zip(ps, rs)]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), self.tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(seqs):   # right padding: positions line up with the unpadded sequence
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
            for j, (p, r) in enumerate(zip(ps, rs)):
                out.append(logp[j, len(p) - 1: len(p) - 1 + len(r)].mean().item())
        return out

    def score(self, prompts, responses, ended):
        lps = self.mean_logprobs(prompts, responses)
        return [round(quality_score(p, r) + 0.25 * lp - (0.0 if e else 1.0), 4)
                for p, r, lp, e in zip(prompts, responses, lps, ended)]


def build_scorer(session, student=None) -> Scorer:
    """The scorer named by models.scorer; the offline one reuses an already-loaded (tokenizer, model) when given
    (in 04, the model that wrote the candidates), else loads the student."""
    kind = session.config.models.scorer
    if kind == "reward_model":
        from .models import load_reward_model

        model, tok = load_reward_model(session.config.models.reward, session.profile)
        return RewardModelScorer(model, tok, min(session.config.preference.batch_size, REWARD_BATCH))
    if kind == "offline":
        from .models import load_model, load_tokenizer

        tok, model = student or (load_tokenizer(session.config.models.student),
                                 load_model(session.config.models.student, session.profile))
        return OfflineScorer(model, tok)
    raise ConfigError(f"config key 'models.scorer': expected 'reward_model' or 'offline', got {kind!r}")
