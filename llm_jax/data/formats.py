"""Records -> token sequences with per-token loss weights: the one template.

An example is `(tokens [n], weights [n])`: `weights[i]` is the loss weight of
predicting `tokens[i]` from `tokens[:i]` (so `weights[0]` is always 0). After
packing, `inputs = tokens[:-1]`, `targets = tokens[1:]`, `weights[1:]`.

    pretrain:        [bos] text [eos]                                weight 1 on every target
    sft / pairs:     [bos, prompt] prompt [response] response [eos]  weight 1 on response + eos
    classification:  [bos] text [eos]   (one example; the label travels beside it, see `loader`)

(`[prompt]`/`[response]` are the special ids 4/5.) The `[response]` marker
itself carries no loss: it is part of the prompt, appended by the caller at
generation time (`prompt_tokens`).

Records longer than the context (`seq_len + 1` tokens, since a row of
`seq_len` slots holds `seq_len + 1` tokens shifted by one):
* pretraining text is cut into consecutive chunks that share one boundary
  token, so every target of the document is scored exactly once;
* an SFT or preference record whose prompt part leaves no room for one
  response token is dropped ("prompt does not fit the context");
* otherwise the response (each of chosen/rejected) is truncated, losing its
  eos; such records are counted as "truncated".
* a preference pair whose chosen and rejected are the same tokens once
  truncated (they differ only past the context) is dropped: it carries no
  preference, yet would add log 2 to the loss, count in the pair normalizer and
  as a wrong answer in accuracy.
* classification text is cut to its first `seq_len + 1` tokens (counted as
  "truncated"): a label belongs to the whole text, so chunks would each need it.
"""

from __future__ import annotations

import numpy as np

Example = tuple[np.ndarray, np.ndarray]  # (tokens int32 [n], weights float32 [n])
PROMPT_TOO_LONG = "prompt does not fit the context"
SAME_AFTER_TRUNCATION = "chosen and rejected identical after truncation to seq_len={}"


def _example(tokens: list[int], first_scored: int) -> Example:
    weights = np.zeros(len(tokens), np.float32)
    weights[max(first_scored, 1):] = 1.0
    return np.asarray(tokens, np.int32), weights


def pretrain_examples(tok, text: str, seq_len: int) -> tuple[list[Example], int]:
    """([bos] text [eos] in chunks of at most seq_len + 1 tokens, chunks beyond the first)."""
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    chunks = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    return [_example(c, 1) for c in chunks], len(chunks) - 1


def prompt_tokens(tok, prompt: str) -> list[int]:
    """The tokens a model sees before its response: [bos, prompt] prompt [response]."""
    return [tok.bos_id, tok.prompt_id, *tok.encode(prompt), tok.response_id]


def sft_example(tok, prompt: str, response: str, seq_len: int,
                head: list[int] | None = None) -> tuple[Example, bool] | str:
    """(example, truncated) or the reason the record is dropped."""
    head = prompt_tokens(tok, prompt) if head is None else head
    if len(head) > seq_len:  # no room for a single scored response token
        return PROMPT_TOO_LONG
    tokens = head + tok.encode(response) + [tok.eos_id]
    truncated = len(tokens) > seq_len + 1
    return _example(tokens[:seq_len + 1], len(head)), truncated


def to_examples(record: dict, kind: str, tok, seq_len: int) -> tuple[list, int] | str:
    """A checked record -> (examples, truncations) or the reason it is dropped.

    pretrain, sft and classification give a list of `Example`; preferences give a list with one
    `(chosen Example, rejected Example)` pair."""
    if kind == "pretrain":
        return pretrain_examples(tok, record["text"], seq_len)
    if kind == "classification":
        ids = [tok.bos_id, *tok.encode(record["text"]), tok.eos_id]
        return [_example(ids[:seq_len + 1], 1)], int(len(ids) > seq_len + 1)
    if kind == "sft":
        out = sft_example(tok, record["prompt"], record["response"], seq_len)
        return out if isinstance(out, str) else ([out[0]], int(out[1]))
    head = prompt_tokens(tok, record["prompt"])
    chosen = sft_example(tok, record["prompt"], record["chosen"], seq_len, head)
    if isinstance(chosen, str):
        return chosen
    rejected = sft_example(tok, record["prompt"], record["rejected"], seq_len, head)
    # check_record refuses equal answers, but two that differ only beyond the context
    # become equal here. Equal tokens mean equal weights too (same prompt part).
    if np.array_equal(chosen[0][0], rejected[0][0]):
        return SAME_AFTER_TRUNCATION.format(seq_len)
    return [(chosen[0], rejected[0])], int(chosen[1] or rejected[1])
