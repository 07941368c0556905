"""The served model in the OpenAI API's shapes: requests, responses, stream chunks and errors.

    POST /v1/chat/completions  {model, messages, max_tokens | max_completion_tokens, temperature,
                               top_p, seed, stop, n, user, stream, stream_options}
    POST /v1/completions       the same with `prompt` for `messages`
    GET  /v1/models            {"object": "list", "data": [model]}; GET /v1/models/{id}: one model

What differs from api.openai.com, on purpose:
- `model` is the production version id (GET /v1/models lists it) or the alias "default"; any other
  name is a 404 error object. The answer's `model` is always the version id that answered.
- `temperature` defaults to 0 (greedy): the answer the eval report scored, exactly /v1/generate's.
  Above 0, tokens are drawn from a generator of the request's own (temperature, then top_p): with
  a `seed`, the same answer on every call, alone or sharing a batch.
- `max_tokens` defaults to 48 as /v1/generate's max_new_tokens, and is at most 128; `n` must be 1.
- A prompt (completions), like a chat's user turn, is rendered with the prompt template the model
  was trained on, as /v1/generate does: the answer is the assistant's reply, not a raw continuation.
- The completion `id` is the answer's response_id: rate it with POST /v1/feedback using the
  `feedback_token` field of the answer, or the X-Feedback-Token header (the only place a stream
  carries it). `usage` counts the model's tokens: the prompt as rendered (BOS included), and the
  generated tokens (EOS included).
- `user` is accepted and not stored; `frequency_penalty`, `presence_penalty` and `logprobs` are
  accepted only at their neutral values.
- Errors are `{"error": {"message", "type", "param", "code"}}`: 400 a value refused (n above 1,
  an empty or out-of-order conversation, a number out of range), 422 a body of the wrong shape (a
  wrong JSON type, a missing or unknown field), 401 a bad key, 404 an unknown model, 413 a body too
  large, 429 a rate or in-flight limit (with Retry-After), 503 a full queue or an unavailable
  database (with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmops_dagster import generation

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
DEFAULT_MODEL_ALIAS = "default"
MAX_STOP = 4  # stop strings a request may send (OpenAI's limit)
MAX_STOP_CHARS = 200
DEFAULT_MAX_TOKENS = 48  # as GenerateRequest.max_new_tokens
MAX_TOKENS = 128  # as app.MAX_NEW_TOKENS
MAX_PROMPT_CHARS = 2000  # as app.MAX_PROMPT_CHARS
MAX_TURNS = 32  # as app.MAX_TURNS
OWNED_BY = "llmops-dagster"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "timeout", 409: "conflict_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_exceeded",
               503: "service_unavailable"}
# Pydantic error types that mean the body has the wrong shape (422); any other refusal is of a value (400).
_SHAPE_ERRORS = {"missing", "json_invalid", "extra_forbidden", "model_type", "dict_type",
                 "model_attributes_type", "union_tag_invalid", "literal_error"}


def is_openai_path(path: str) -> bool:
    return path in PATHS or path.startswith("/v1/models/")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


def validation_error(errors: list[dict]) -> tuple[int, dict]:
    """The status and error object of a refused body (pydantic errors): the first error's field
    and message; 422 when every error is of the body's shape (a union reports each of its
    branches: a value refused by one of them is a 400), else 400."""
    shape = all(e.get("type") in _SHAPE_ERRORS or str(e.get("type", "")).endswith("_type") for e in errors)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                        f"{e.get('msg')}" for e in errors[:8])
    status = 422 if shape else 400
    return status, error_body(status, message, param, "invalid_value" if status == 400 else "invalid_body")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer system
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_TURNS)]
    name: Annotated[str | None, Field(max_length=64)] = None  # accepted, not used

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def turn(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_TOKENS)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=MAX_TOKENS)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    # torch.Generator.manual_seed's range
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1)] = None
    stop: (Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOP)] | None) = None
    n: int | None = None
    user: Annotated[str | None, Field(max_length=256)] = None  # accepted, not stored
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported: send one request per answer wanted")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info) -> float | None:
        if value:
            raise ValueError(f"{info.field_name} is not supported (only 0)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def decoding(self) -> generation.Decoding:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return generation.Decoding(
            max_new_tokens=self.max_new_tokens(), temperature=self.temperature or 0.0,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop)

    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_TURNS)]

    def generate_fields(self) -> dict:
        """The /v1/generate request this asks (app.GenerateRequest's fields)."""
        return {"messages": [m.turn() for m in self.messages], "max_new_tokens": self.max_new_tokens()}


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def generate_fields(self) -> dict:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return {"prompt": prompt, "max_new_tokens": self.max_new_tokens()}


# ---------------------------------------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(chat: bool, row: dict, model: str, created: int, feedback_token: str) -> dict:
    """The whole answer (not streamed): a chat.completion or a text_completion."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": row["response"], "refusal": None},
                  "logprobs": None, "finish_reason": row["finish_reason"]}
    else:
        choice = {"index": 0, "text": row["response"], "logprobs": None,
                  "finish_reason": row["finish_reason"]}
    return {"id": row["id"], "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": usage(row["prompt_tokens"], row["completion_tokens"]),
            "system_fingerprint": None, "feedback_token": feedback_token}


def chunk(chat: bool, response_id: str, model: str, created: int, text: str | None = None,
          finish_reason: str | None = None, first: bool = False, with_usage: bool = False) -> dict:
    """One stream event's object: a text delta, or the last one with its finish_reason."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    body = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
    return body


def usage_chunk(chat: bool, response_id: str, model: str, created: int, row: dict) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(row["prompt_tokens"], row["completion_tokens"])}


def event(body: dict | str) -> bytes:
    """One server-sent event."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n".encode()


def model_object(version: str, created: int, lineage: dict) -> dict:
    return {"id": version, "object": "model", "created": created, "owned_by": OWNED_BY, "lineage": lineage}


# ---------------------------------------------------------------------------------------------- streams


class TokenStream:
    """The text of one streamed answer, pushed from the batch's worker thread to the request's
    event loop as it is generated. What is sent is always a prefix of the logged answer
    (app.storable_answer(text).strip()): leading whitespace, and a tail that may still change
    (trailing whitespace, an incomplete UTF-8 character, the start of a stop string), wait for
    the next token."""

    END = object()  # queued once the answer's batch has returned (or failed)

    def __init__(self, stop: tuple[str, ...], clean):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = stop
        self.clean = clean  # app.storable_answer
        self.cancelled = False  # set when the client has gone; read by the generation loop each step
        self.sent = ""  # written by the worker thread during the batch, by the loop after it

    def _visible(self, text: str) -> str:
        text = self.clean(text).lstrip()
        while True:  # each cut can expose another tail that waits
            shorter = text.rstrip().rstrip("\ufffd")
            held = max((n for s in self.stop for n in range(1, len(s)) if shorter.endswith(s[:n])), default=0)
            shorter = shorter[:len(shorter) - held]
            if shorter == text:
                return text
            text = shorter

    def push(self, text: str) -> None:
        """In the worker thread: queue what `text` (the answer so far) adds to what was sent."""
        visible = self._visible(text)
        if len(visible) > len(self.sent) and visible.startswith(self.sent):
            delta, self.sent = visible[len(self.sent):], visible
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def rest(self, final: str) -> str:
        """In the loop, after the batch: what the logged answer `final` adds to what was sent."""
        if final.startswith(self.sent) and len(final) > len(self.sent):
            rest, self.sent = final[len(self.sent):], final
            return rest
        return ""
