"""Batched, KV-cached text generation shared by every stage (Magpie, preference sampling, evaluation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "Sampling":
        return cls(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, do_sample=False)


@dataclass
class Completion:
    text: str
    n_tokens: int
    ended: bool          # stopped on EOS (not cut off at max_new_tokens)


def eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([tok.eos_token_id, *ids]))


def chat_input_ids(tok, conversations: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation through the tokenizer's chat template, ready for the assistant turn.

    Rendered to text, then tokenized without special tokens: the template already holds BOS (no double BOS).
    """
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


class BlockFirstTokens:
    """Logits processor: forbid `banned` tokens until the row has produced a non-blank token.

    Magpie's fix against solution-shaped "instructions": no markdown header (`#`, `##`, ...) may open one.
    """

    def __init__(self, banned: Sequence[int], blank: torch.Tensor, prompt_len: int = 0):
        self.banned = torch.tensor(sorted(set(banned)), dtype=torch.long)
        self.blank = blank            # bool per token id: decodes to whitespace only
        self.prompt_len = prompt_len

    @classmethod
    def markdown_headers(cls, tok) -> "BlockFirstTokens":
        blank = torch.tensor([not tok.decode([t]).strip() for t in range(len(tok))], dtype=torch.bool)
        return cls(markdown_header_tokens(tok), blank)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:]
        # ids past the tokenizer's vocabulary (padded embedding rows) count as non-blank
        gen = gen.clamp(max=len(self.blank) - 1)
        at_start = self.blank.to(gen.device)[gen].all(dim=1) if gen.shape[1] else \
            torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if at_start.any():
            rows = at_start.nonzero().squeeze(1)
            scores[rows.unsqueeze(1), self.banned.to(scores.device).unsqueeze(0)] = float("-inf")
        return scores


def markdown_header_tokens(tok) -> list[int]:
    """Every token whose text, leading spaces removed, starts with '#'."""
    return [tid for tid in range(len(tok)) if tok.decode([tid]).lstrip(" \t").startswith("#")]


@torch.inference_mode()
def generate_batch(model, tok, batch: list[list[int]], sampling: Sampling,
                   logits_processors: Optional[list] = None) -> list[Completion]:
    pad = tok.pad_token_id
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(batch):   # left padding: new tokens line up at the right edge
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    device = next(model.parameters()).device
    stop = eos_ids(model, tok)
    kwargs = dict(do_sample=sampling.do_sample, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                  eos_token_id=stop, use_cache=True)
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    if logits_processors:
        from transformers import LogitsProcessorList

        for p in logits_processors:
            if hasattr(p, "prompt_len"):
                p.prompt_len = width
        kwargs["logits_processor"] = LogitsProcessorList(logits_processors)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, width:].cpu()
    results = []
    for row in new.tolist():
        n, ended = len(row), False
        for j, t in enumerate(row):
            if t in stop:
                n, ended = j, True
                break
        while n and row[n - 1] == pad and not ended:
            n -= 1
        results.append(Completion(tok.decode(row[:n], skip_special_tokens=True).strip(), n, ended))
    return results


def generate(model, tok, inputs: list[list[int]], sampling: Sampling, batch_size: int,
             logits_processors: Optional[list] = None, desc: Optional[str] = None) -> list[Completion]:
    """Generate for every input, batched by similar length (less padding), results in input order."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    results: list[Optional[Completion]] = [None] * len(inputs)
    bar = tqdm(total=len(inputs), desc=desc, unit="row", disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, c in zip(idx, generate_batch(model, tok, [inputs[i] for i in idx], sampling, logits_processors)):
            results[i] = c
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]
