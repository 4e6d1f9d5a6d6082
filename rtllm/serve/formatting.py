"""OpenAI response bodies: chat.completion / text_completion objects, their stream chunks, usage,
logprobs in each endpoint's format, and the SSE framing."""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any

from rtllm.executor.result import GenerationResult, RequestOutput


class ResponseFormatter:
    """Builds one endpoint's JSON objects; ``chat`` selects chat.completion vs text_completion."""

    def __init__(self, model: str, chat: bool, request_id: str, tokenizer, top_logprobs: int | None,
                 echo_texts: list[str] | None = None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.k = top_logprobs
        self.echo_texts = echo_texts
        self._token_str = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, text_offset0: int = 0):
        if self.k is None or entries is None:
            return None
        if self.chat:
            content = []
            for tid, entry in zip(token_ids, entries):
                s = self._token_str(tid)
                top = sorted(entry.items(), key=lambda kv: -kv[1])[: self.k]
                content.append({"token": s, "logprob": entry.get(tid, float("-inf")), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": (t := self._token_str(i)), "logprob": lp,
                                                  "bytes": list(t.encode())} for i, lp in top]})
            return {"content": content, "refusal": None}
        tokens, lps, tops, offsets, off = [], [], [], [], text_offset0
        for tid, entry in zip(token_ids, entries):
            s = self._token_str(tid)
            tokens.append(s)
            lps.append(entry.get(tid, float("-inf")))
            tops.append({self._token_str(i): lp for i, lp in sorted(entry.items(), key=lambda kv: -kv[1])[: self.k]})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, text: str, token_ids: list[int], entries, finish_reason: str | None) -> dict:
        lp = self.logprobs(token_ids, entries)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": lp, "finish_reason": finish_reason}
        if self.echo_texts is not None:
            text = self.echo_texts[index] + text
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage,
                "system_fingerprint": None}

    def chunk(self, index: int, text: str | None, token_ids: list[int], entries, finish_reason: str | None,
              role: bool = False, usage: Any = ...) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c = {"index": index, "delta": delta, "logprobs": self.logprobs(token_ids, entries),
                 "finish_reason": finish_reason}
        else:
            c = {"index": index, "text": text or "", "logprobs": self.logprobs(token_ids, entries),
                 "finish_reason": finish_reason}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [c]}
        if usage is not ...:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage}


def usage(results: list[GenerationResult], prompt_lens: list[int], outputs: list[RequestOutput | None]) -> dict:
    completion = sum(len(o.token_ids) for out in outputs if out is not None for o in out.outputs)
    prompt = sum(prompt_lens)
    cached = sum(r.metrics.num_cached_prompt_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"

