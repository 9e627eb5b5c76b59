"""`openai`: a live OpenAI-compatible server (trtllm-serve, vLLM, SGLang) via /v1/completions.

Prompts go as token-id lists (no retokenization). What the server offers is probed at start:
  prompt scores  vLLM's `prompt_logprobs` extension (token ids as keys), else `echo` with
                 `logprobs` and `return_tokens_as_token_ids`; neither -> no score metrics;
  token ids      `return_tokens_as_token_ids` on generated tokens ("token_id:N"), else the
                 generated text is re-tokenized with the golden's tokenizer (said in the notes);
  exact length   `ignore_eos` (vLLM, trtllm-serve); else a continuation may stop at EOS.
Greedy is temperature 0; sampled continuations send the setting's `temperature`, `top_p` and
`seed` (OpenAI completions fields; the server's own sampler draws). Only a server's own top-k
is visible, so KL covers the golden top-k ids that appear in the server's answer
(builder.verify.metrics explains the bucket).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from builder.errors import UserError
from builder.verify.metrics import SequenceScore
from builder.verify.runtimes.base import ArtifactInfo, Capabilities, until_eos
from builder.verify.runtimes.http import ServerError, request_json
from builder.verify.sampling import Sampling

PROBE_IDS = (1, 2, 3, 4, 5, 6, 7, 8)


def parse_token(token: str) -> int | None:
    """'token_id:123' -> 123 (vLLM's return_tokens_as_token_ids); anything else -> None."""
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.split(":", 1)[1])
        except ValueError:
            return None
    return None


def scores_from_prompt_logprobs(entries: list[Any], ids: list[int], k: int) -> SequenceScore:
    """vLLM `prompt_logprobs`: entry i (None for i = 0) maps token-id strings to
    {logprob, rank, ...} for the top-k at position i plus the actual token."""
    if len(entries) != len(ids):
        raise ServerError(
            f"prompt_logprobs has {len(entries)} entries for {len(ids)} prompt tokens"
        )
    top_ids, top_lp, target = [], [], []
    for position in range(1, len(ids)):
        entry = entries[position] or {}
        ranked = sorted(
            ((int(t), float(v["logprob"])) for t, v in entry.items()), key=lambda tv: -tv[1]
        )
        actual = entry.get(str(ids[position]))
        target.append(float(actual["logprob"]) if actual else float("nan"))
        top_ids.append(_pad([t for t, _ in ranked[:k]], k, -1))
        top_lp.append(_pad([v for _, v in ranked[:k]], k, float("nan")))
    return SequenceScore(
        torch.tensor(top_ids),
        torch.tensor(top_lp, dtype=torch.float64),
        torch.tensor(target, dtype=torch.float64),
    )


def scores_from_echo(logprobs: dict[str, Any], ids: list[int], k: int) -> SequenceScore:
    """OpenAI `echo` + `logprobs`: tokens[i] / top_logprobs[i] cover the prompt, then output."""
    tokens = logprobs.get("tokens") or []
    tops = logprobs.get("top_logprobs") or []
    token_lps = logprobs.get("token_logprobs") or []
    if len(tokens) < len(ids) or len(tops) < len(ids):
        raise ServerError(f"echo returned {len(tokens)} tokens for a {len(ids)}-token prompt")
    top_ids, top_lp, target = [], [], []
    for position in range(1, len(ids)):
        entry = tops[position] or {}
        ranked = sorted(
            ((parse_token(t), float(v)) for t, v in entry.items()), key=lambda tv: -tv[1]
        )
        ranked = [(t, v) for t, v in ranked if t is not None]
        target.append(
            float(token_lps[position]) if token_lps[position] is not None else float("nan")
        )
        top_ids.append(_pad([t for t, _ in ranked[:k]], k, -1))
        top_lp.append(_pad([v for _, v in ranked[:k]], k, float("nan")))
    return SequenceScore(
        torch.tensor(top_ids),
        torch.tensor(top_lp, dtype=torch.float64),
        torch.tensor(target, dtype=torch.float64),
    )


def completion_body(prompt: list[int], sampling: Sampling, ids: bool, ignore_eos: bool) -> dict:
    """The /v1/completions request of one continuation (greedy: temperature 0 alone)."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
    }
    if not sampling.is_greedy:
        body |= {"top_p": sampling.top_p, "seed": sampling.seed}
    if ids:
        body |= {"logprobs": 1, "return_tokens_as_token_ids": True}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _pad(values: list, k: int, fill: Any) -> list:
    return values + [fill] * (k - len(values))


class OpenAIRuntime:
    name = "openai"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        top_k: int = 20,
        tokenizer: Any = None,
        timeout: float = 300.0,
    ):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.top_k, self.tokenizer, self.timeout = top_k, tokenizer, timeout
        listing = request_json(f"{self.base}/v1/models", timeout=timeout)
        names = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
        if not names:
            raise UserError(f"{self.base}/v1/models lists no model")
        if model is not None and model not in names:
            raise UserError(f"{self.base}: no model {model!r} (serves {', '.join(names)})")
        self.model = model or names[0]
        self.device = f"server {self.base}"
        self.score_mode, self.ids_mode, self.ignore_eos, notes = self.probe()
        fingerprint = hashlib.sha256(
            json.dumps(
                [m for m in listing["data"] if m.get("id") == self.model], sort_keys=True
            ).encode()
        ).hexdigest()
        self.artifact = ArtifactInfo(
            f"{self.base}/v1 model {self.model}",
            "server",
            fingerprint,
            {"model": self.model, "score_mode": self.score_mode, "token_ids": self.ids_mode},
        )
        self.capabilities = Capabilities(
            prompt_scores=self.score_mode is not None,
            full_distribution=False,
            greedy=True,
            localize=False,
            top_k=top_k,
            notes=tuple(notes),
        )

    # ---- probing ---------------------------------------------------------------------------------
    def completions(self, **body: Any) -> dict[str, Any]:
        return request_json(
            f"{self.base}/v1/completions", {"model": self.model, **body}, self.timeout
        )

    def _try(self, **body: Any) -> dict[str, Any] | None:
        try:
            return self.completions(**body)
        except ServerError as err:
            if err.status is None or err.status >= 500:
                raise
            return None  # 4xx: the server does not accept this option

    def probe(self) -> tuple[str | None, bool, bool, list[str]]:
        ids = list(PROBE_IDS)
        notes = [f"server {self.base}, model {self.model}"]
        score_mode = None
        answer = self._try(prompt=ids, max_tokens=1, temperature=0, prompt_logprobs=self.top_k)
        if answer and answer["choices"][0].get("prompt_logprobs"):
            score_mode = "prompt_logprobs"
        else:
            answer = self._try(
                prompt=ids,
                max_tokens=1,
                temperature=0,
                echo=True,
                logprobs=self.top_k,
                return_tokens_as_token_ids=True,
            )
            lp = (answer or {}).get("choices", [{}])[0].get("logprobs") or {}
            tops = lp.get("top_logprobs") or []
            if len(tops) >= len(ids) and any(
                parse_token(t) is not None for e in tops[1:] if e for t in e
            ):
                score_mode = "echo"
        notes.append(
            "prompt log-probs: "
            f"{score_mode or 'not offered: KL, top-1 and perplexity are not measured'}"
        )
        answer = self._try(
            prompt=ids,
            max_tokens=2,
            temperature=0,
            logprobs=1,
            return_tokens_as_token_ids=True,
            ignore_eos=True,
        )
        ignore_eos = answer is not None
        if answer is None:
            answer = self.completions(prompt=ids, max_tokens=2, temperature=0, logprobs=1)
        tokens = (answer["choices"][0].get("logprobs") or {}).get("tokens") or []
        ids_mode = bool(tokens) and all(parse_token(t) is not None for t in tokens)
        if not ids_mode and self.tokenizer is None:
            raise UserError(
                f"{self.base}: the server returns no token ids and no tokenizer was given"
            )
        notes.append(
            "greedy token ids: "
            + ("returned by the server" if ids_mode else "re-tokenized from the text (approximate)")
        )
        notes.append(
            "ignore_eos: "
            + (
                "accepted (exact continuation length)"
                if ignore_eos
                else "refused (continuations may stop at EOS)"
            )
        )
        return score_mode, ids_mode, ignore_eos, notes

    # ---- the interface ---------------------------------------------------------------------------
    def score(self, ids: torch.Tensor, golden_top_ids: torch.Tensor | None = None) -> SequenceScore:
        prompt = [int(t) for t in ids]
        if self.score_mode == "prompt_logprobs":
            answer = self.completions(
                prompt=prompt, max_tokens=1, temperature=0, prompt_logprobs=self.top_k
            )
            return scores_from_prompt_logprobs(
                answer["choices"][0]["prompt_logprobs"], prompt, self.top_k
            )
        if self.score_mode == "echo":
            answer = self.completions(
                prompt=prompt,
                max_tokens=1,
                temperature=0,
                echo=True,
                logprobs=self.top_k,
                return_tokens_as_token_ids=True,
            )
            return scores_from_echo(answer["choices"][0]["logprobs"], prompt, self.top_k)
        raise UserError(f"{self.base}: the server offers no prompt log-probs")

    def generate(
        self, prompt_ids: torch.Tensor, sampling: Sampling, eos_id: int | None = None
    ) -> list[int]:
        n = sampling.max_tokens
        if n == 0:
            return []
        prompt = [int(t) for t in prompt_ids]
        # With an eos_id the server stops at its own EOS; without, the exact length is asked for.
        body = completion_body(prompt, sampling, self.ids_mode, self.ignore_eos and eos_id is None)
        choice = self.completions(**body)["choices"][0]
        if self.ids_mode:
            tokens = [parse_token(t) for t in choice["logprobs"]["tokens"]]
        else:
            tokens = self.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
        return until_eos(tokens, n, eos_id)

    def close(self) -> None:
        pass
