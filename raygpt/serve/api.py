"""The OpenAI completions API over a TextGenerator: requests checked field by field, responses in OpenAI's
shapes. No Ray and no FastAPI here (the deployment in raygpt/serve/app.py calls these), so the rules are
unit-tested on their own.

A bad request is an ApiError: HTTP 400 with OpenAI's error object, whose ``param`` names the field.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from raygpt.config import ServeConfig, check_sampling
from raygpt.generate import Row, TextGenerator, check_prompt

MAX_N = 64  # choices per prompt
MAX_STOPS = 4  # OpenAI's limit
# Fields that would change what OpenAI returns and that this server does not do: refused, not ignored.
UNSUPPORTED = {"echo": (None, False), "logprobs": (None, 0), "suffix": (None, ""), "best_of": (None, 1),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


class ApiError(ValueError):
    """A request the server refuses: ``status`` and OpenAI's error object (message, type, param, code)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """A checked completions request: one Row per (prompt, choice), in OpenAI's choice order."""
    id: str
    model: str
    created: int
    rows: list[Row]
    prompt_tokens: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    warnings: list[str] = field(default_factory=list)
    fingerprint: Optional[str] = None  # system_fingerprint: which replica answered (raygpt-PID)


def parse_completion(body: bytes, gen: TextGenerator, settings: ServeConfig, model: str) -> Completion:
    """The request ``body`` of POST /v1/completions, checked: every problem is an ApiError naming its field,
    raised before any token is generated."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON ({e}); send a JSON object such as "
                       '{"prompt": "Hello", "max_tokens": 16}') from None
    if not isinstance(req, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(req).__name__}")
    if req.get("model") not in (None, model):
        raise ApiError(f"model {req['model']!r} is not served here; this server serves {model!r} "
                       "(GET /v1/models)", "model", status=404, code="model_not_found")
    for key, allowed in UNSUPPORTED.items():
        if key in req and req[key] not in allowed:
            raise ApiError(f"{key}={req[key]!r} is not supported by this server; leave it out", key)
    max_tokens = req.get("max_tokens", settings.default_max_tokens)
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > settings.max_tokens_cap:
        raise ApiError(f"max_tokens={max_tokens} is more than this server's cap of {settings.max_tokens_cap} "
                       "(serve.max_tokens_cap); ask for fewer", "max_tokens")
    temperature = _number(req, "temperature", 1.0)
    top_p = _number(req, "top_p", None)
    top_k, seed, n = req.get("top_k"), req.get("seed"), req.get("n", 1)
    n = 1 if n is None else n
    stops = req.get("stop")
    stops = [stops] if isinstance(stops, str) else stops if stops is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or any(not isinstance(s, str) or not s for s in stops):
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got "
                       f"{req.get('stop')!r}"[:300], "stop")
    try:
        check_sampling(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       num_samples=n)
    except ValueError as e:
        text = str(e).replace("max_new_tokens", "max_tokens").replace("num_samples", "n")
        raise ApiError(text, text.split("=")[0]) from None
    if n > MAX_N:
        raise ApiError(f"n={n} is more than {MAX_N} choices per prompt", "n")
    stream = req.get("stream", False)
    options = req.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError("stream must be true or false and stream_options an object", "stream")
    prompts = _prompts(req, gen)
    block = gen.config.model.block_size
    warnings = [f"prompt {i} has {len(ids)} tokens, more than the model's context of {block}: its first "
                f"{len(ids) - block} tokens were dropped (truncated from the left)"
                for i, ids in enumerate(prompts) if len(ids) > block]
    rows = [Row(ids[-block:], max_tokens, temperature, top_k, top_p,
                gen.generator(None if seed is None else seed + j), stops)
            for ids in prompts for j in range(n)]
    return Completion(id=f"cmpl-{uuid.uuid4().hex[:24]}", model=model, created=int(time.time()), rows=rows,
                      prompt_tokens=sum(min(len(ids), block) for ids in prompts), stream=stream,
                      include_usage=bool(options.get("include_usage")), warnings=warnings)


def _number(req: dict, key: str, default: Any) -> Any:
    value = req.get(key, default)
    value = default if value is None else value
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ApiError(f"{key}={value!r} must be a number", key)
    return None if value is None else float(value)


def _prompts(req: dict, gen: TextGenerator) -> list[list[int]]:
    """The prompts' token ids: a string, a list of strings, a list of token ids or a list of such lists
    (OpenAI's four forms). The empty string is a new document (the end-of-text token)."""
    if "prompt" not in req:
        raise ApiError('prompt is required: a string or a list of strings, e.g. "prompt": "Hello"', "prompt")
    prompt = req["prompt"]
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(f"prompt must be a string, a list of strings or of token ids, not {req['prompt']!r}"[:300],
                       "prompt")
    vocab = gen.config.model.vocab_size
    prompts = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            try:
                check_prompt(gen.tokenizer, p, f"prompt[{i}]" if len(prompt) > 1 else "prompt",
                             "leave those characters out: a char-level model knows only the characters of its "
                             "training corpus")
            except ValueError as e:
                raise ApiError(str(e), "prompt") from None
            prompts.append(gen.prompt_ids(p))
        elif (isinstance(p, list) and p
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p)):
            prompts.append(list(p))
        else:
            raise ApiError(f"prompt[{i}] must be a string or a non-empty list of token ids from 0 to {vocab - 1}",
                           "prompt")
    return prompts


def choice(index: int, text: str, finish: Optional[str]) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def usage(c: Completion, completion_tokens: int) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": c.prompt_tokens + completion_tokens}


def response(c: Completion, choices: list[dict], completion_tokens: int) -> dict:
    """The whole answer of a request without stream (choices in index order)."""
    out = {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
           "system_fingerprint": c.fingerprint, "choices": choices, "usage": usage(c, completion_tokens)}
    if c.warnings:
        out["warnings"] = c.warnings  # beyond OpenAI's shape: clients ignore fields they do not know
    return out


def chunk(c: Completion, choices: list[dict], completion_tokens: Optional[int] = None,
          warnings: Optional[list[str]] = None) -> str:
    """One server-sent event of a streamed answer (the usage in the last one, warnings in the first)."""
    out = {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
           "system_fingerprint": c.fingerprint, "choices": choices}
    if completion_tokens is not None:
        out["usage"] = usage(c, completion_tokens)
    if warnings:
        out["warnings"] = warnings
    return f"data: {json.dumps(out)}\n\n"


DONE = "data: [DONE]\n\n"


def model_card(name: str, gen: TextGenerator, meta: dict, quantize: str) -> dict:
    """GET /v1/models' entry for the checkpoint: OpenAI's fields, and what a user wants to know of it."""
    return {"id": name, "object": "model", "created": int(meta.get("created", time.time())), "owned_by": "raygpt",
            "step": meta.get("step"), "val_loss": meta.get("val_loss"), "parameters": gen.params,
            "context": gen.config.model.block_size, "tokenizer": gen.config.data.tokenizer, "quantize": quantize,
            "checkpoint": meta.get("path")}
