"""The served model: a Ray Serve deployment with a FastAPI ingress, and its typed builder.

    POST /v1/generate  {prompt | messages, max_new_tokens?}  (messages: [{role, content}, ...],
                       a conversation ending with the user's turn)
                       -> {response_id, text, model_version, latency_ms, feedback_token}
    POST /v1/feedback  {response_id, rating, correction?, comment?, feedback_token?, client_id?}
                       -> {feedback_id, status, counted, reason, review}
    GET  /v1/reviews   corrections waiting for review (reviewer key)
    POST /v1/reviews/{feedback_id}  {decision: accept|reject, note?} (reviewer key)
    POST /v1/chat/completions, POST /v1/completions  the OpenAI API's shapes, streamed as server-sent
                       events with `stream: true` (`openai_api.py` says what differs from OpenAI's)
    GET  /v1/models    {"object": "list", "data": [{id, object, created, owned_by, lineage}]}
    GET  /v1/models/{id}, GET /healthz, GET / (a page to ask, rate, and review with a reviewer key)

Credentials (`credentials.py`): an API key as `Authorization: Bearer ...`, or the feedback token
that came with an answer. A wrong or revoked key gets 401; a rating is always stored, and counts
towards the loop only with a credential, once per answer and rater (the answer says which and why).
Every endpoint that writes is rate limited (429 with Retry-After): a request whose key
authenticates spends its key's budget, any other its client host's (`rate_limits.py`). Before a
replica sees a request, Serve's proxy admits it (`admission.py`): body size and time limits,
requests in flight per client, X-Forwarded-For only from a trusted proxy, /healthz answered
without queueing behind generation; and the deployment's queue is bounded (503 with Retry-After).

Requests are batched while the model is busy (`batching.py`) and answered by greedy decoding, or
sampled with a seed of the request's own (OpenAI routes, temperature above 0). A streamed answer's
tokens are sent as its batch generates them; a client that leaves mid-stream ends its row at the
next step. Every answer goes to `request_log` with the model version and how it ended (committed
before its 200, or before a stream's last event, with the rows of the answers that finished beside
it; a stream cut off by its client is logged too), every rating to `feedback`; all SQL is
parameterized. Inputs are validated by strict pydantic models: a bad type, size or character gets a
4xx that names the field, never a 5xx. The deployment class is plain Python, so it builds and tests
without a cluster.
"""


import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, NamedTuple

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from sqlalchemy.exc import DBAPIError

from llmops_dagster import generation
from llmops_dagster.dataset.formats import ROLES, turn_order_error
from llmops_dagster.feedback import review
from llmops_dagster.prompts.rendering import PromptRenderer, render_prompt
from llmops_dagster.serving import batching, credentials, openai_api, traffic_log
from llmops_dagster.serving.admission import AdmissionSettings, budget_host
from llmops_dagster.serving.page import PAGE_CSP, PAGE_HTML
from llmops_dagster.serving.rate_limits import RateLimits
from llmops_dagster.training.run_config import FinetuneSettings

MAX_PROMPT_CHARS = 2000
MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 128
MAX_TURNS = 32  # turns of a conversation sent to /v1/generate


def _storable(value: str | None, field: str) -> str | None:
    """PostgreSQL text holds any Unicode but NUL, and only valid code points (no lone surrogates)."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{field} is not valid Unicode (lone surrogate at {error.start})") from error
    return value


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Annotated[str, Field(description="system, user or assistant")]
    content: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return value

    @field_validator("content")
    @classmethod
    def _content_storable(cls, value: str) -> str:
        return _storable(value, "content")


class GenerateRequest(BaseModel):
    """A prompt, or a conversation (`messages`) whose last turn is the user's: exactly one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str | None, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = None
    messages: Annotated[list[ChatTurn] | None, Field(min_length=1, max_length=MAX_TURNS)] = None
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 48

    @field_validator("prompt")
    @classmethod
    def _prompt_storable(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("prompt must contain more than whitespace")
        return _storable(value, "prompt")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        if self.messages is not None:
            if self.messages[-1].role != "user":
                raise ValueError("messages: the last turn must be the user's message to answer")
            error = turn_order_error([t.role for t in self.messages])  # the training data's rule
            if error:
                raise ValueError(error)
        return self

    def user_message(self) -> str:
        return self.prompt if self.prompt is not None else self.messages[-1].content

    def context(self) -> list[dict] | None:
        """The turns before the user's message, None for a single-turn request."""
        return [t.model_dump() for t in self.messages[:-1]] or None if self.messages else None


class GenerateResponse(BaseModel):
    response_id: str
    text: str
    model_version: str
    latency_ms: float
    feedback_token: str  # lets whoever received this answer rate it (POST /v1/feedback)


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    decision: Annotated[str, Field(description="accept or reject")]
    note: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] = ""

    @field_validator("decision")
    @classmethod
    def _decision(cls, value: str) -> str:
        if value not in review.DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(review.DECISIONS)}")
        return value

    @field_validator("note")
    @classmethod
    def _note_storable(cls, value: str) -> str:
        return _storable(value, "note")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    response_id: uuid.UUID | Annotated[str, Field(max_length=64)]
    rating: Annotated[int, Field(description="1 (good) or -1 (bad)")]
    correction: Annotated[str | None, Field(max_length=MAX_TEXT_CHARS)] = None
    comment: Annotated[str | None, Field(max_length=MAX_TEXT_CHARS)] = None
    feedback_token: Annotated[str | None, Field(max_length=64)] = None
    # A label the sender chooses (the page keeps one per browser); never an identity: who rated
    # comes from the API key or the feedback token.
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = "anonymous"

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: int) -> int:
        if value not in (-1, 1):
            raise ValueError("rating must be 1 (good) or -1 (bad)")
        return value

    @field_validator("correction", "comment", "client_id", "feedback_token")
    @classmethod
    def _text_storable(cls, value: str | None, info) -> str | None:
        return _storable(value, info.field_name)

    @field_validator("response_id")
    @classmethod
    def _uuid(cls, value) -> uuid.UUID:
        try:
            return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
        except ValueError as error:
            raise ValueError("response_id must be a response_id returned by /v1/generate") from error


class Ask(NamedTuple):
    """One generate request waiting for its batch: what was asked, when (time.perf_counter(), s),
    the key that asked (None: none), the asker's budget host (admission.budget_host: the actor
    of its ratings when it has no key), its response id, how to decode it (None: greedy within
    the request's max_new_tokens) and the stream its text goes to as it is generated (None: none)."""

    request: GenerateRequest
    started: float
    key_id: int | None
    client_host: str
    response_id: str
    decoding: generation.Decoding | None = None
    stream: openai_api.TokenStream | None = None


@dataclass(frozen=True)
class ServingConfig:
    """Everything a replica needs; built by the serving_deployment asset from the registry."""

    model_version: str
    model_path: str  # merged Hugging Face folder
    prompt_renderer: dict  # how the model's prompt set was rendered (rendering.PromptRenderer)
    # The database URL is a secret: a replica reads it from this file (0600, or a secret mounted on
    # every node), never from its constructor arguments, which Ray keeps in its GCS.
    database_url_file: str
    database: str  # the database named without its password (user@host:port/db), for the digest
    lineage: dict  # dataset / prompt-set / base-model versions
    max_batch_size: int = field(default=8, metadata={
        "help": "Most requests answered by one generate call. A batch is formed when the model is "
        "free, from the requests that queued while it was busy (batching.BusyBatcher)."})
    batch_wait_timeout_s: float = field(default=0.0, metadata={
        "help": "How long an idle model waits for company after a lone request (s); 0 answers at "
        "once (a busy model never waits: its next batch queued meanwhile)."})
    seq_len: int = FinetuneSettings.seq_len  # prompt tokens kept: the length the model trained on
    replicas: int = 1  # Serve replicas (RayServeResource.replicas); part of what a deploy changes
    max_replicas_per_node: int | None = None  # RayServeResource.max_replicas_per_node
    generate_requires_key: bool = field(default=False, metadata={
        "help": "Refuse /v1/generate without a client, rater or reviewer key (401). Open is allowed "
        "only while Serve listens on loopback (serving_deployment refuses otherwise)."})
    generate_rate_limit: str = field(default="120/minute", metadata={
        "help": "Most /v1/generate requests per API key and per source address (a `limits` string, "
        "e.g. 120/minute); over it: 429 with Retry-After."})
    feedback_rate_limit: str = field(default="60/minute", metadata={
        "help": "Most /v1/feedback and /v1/reviews requests per API key and per source address."})
    max_queued_requests: int = field(default=256, metadata={
        "help": "Requests queued at the proxy beyond what replicas are working on; over it: 503 "
        "with Retry-After (Serve's backpressure), never unbounded waiting."})
    # What Serve's proxies admit (admission.AdmissionSettings, as a dict): published to every
    # proxy by the deploy; part of the digest, so a change of limits is a deploy.
    admission: dict = field(default_factory=lambda: asdict(AdmissionSettings()))

    def digest(self) -> str:
        """A short hash of everything a replica serves with (the database by name, not its
        password): equal digests mean redeploying would change nothing."""
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


api = FastAPI(title="llmops-dagster", description="The approved model, served.")


def _openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                  headers: dict | None = None) -> Response:
    return Response(json.dumps(openai_api.error_body(status, message, param, code), ensure_ascii=True),
                    status_code=status, media_type="application/json", headers=headers)


@api.exception_handler(RequestValidationError)
async def _refuse(request, error: RequestValidationError) -> Response:
    """422 naming each bad field. FastAPI's own handler echoes the bad input back and fails with a
    500 when it cannot encode it (a lone surrogate, NaN); this one sends type, location and message
    only, ASCII-escaped, so any refused input gets a 4xx. On the OpenAI routes: an OpenAI error
    object, 400 for a refused value, 422 for a body of the wrong shape (openai_api.validation_error)."""
    detail = [{"type": e.get("type"), "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg"))} for e in error.errors()]
    if openai_api.is_openai_path(request.url.path):
        status, body = openai_api.validation_error(detail)
        return Response(json.dumps(body, ensure_ascii=True), status_code=status,
                        media_type="application/json")
    return Response(json.dumps({"detail": detail}, ensure_ascii=True), status_code=422,
                    media_type="application/json")


@api.exception_handler(HTTPException)
async def _http_error(request, error: HTTPException) -> Response:
    """FastAPI's answer, but an OpenAI error object (same status and headers) on the OpenAI routes."""
    if openai_api.is_openai_path(request.url.path):
        return _openai_error(error.status_code, str(error.detail), headers=error.headers)
    return await http_exception_handler(request, error)


def _read_database_url(path: str) -> str:
    """The database URL from the replica's secret file; a clear error naming it when missing."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise RuntimeError(f"the serving database URL file {path} cannot be read ({error.strerror}): "
                           "set serving_deployment.database_url_file to a file on every Serve node") from None


def storable_answer(text: str) -> str:
    """Generated text without what PostgreSQL text cannot hold (NUL; lone surrogates): a model can
    decode a NUL byte (the byte-level tokenizer has one), and one such answer would fail the
    whole batch's INSERT."""
    return "".join(c for c in text if c != "\x00" and not 0xD800 <= ord(c) <= 0xDFFF)


def _bearer(request: Request) -> str | None:
    """The key of an `Authorization: Bearer KEY` header; None without one; 401 when malformed.
    Defined above the deployment class: `serve.ingress` captures the module's globals as they
    are when the class is defined."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > 128 or not key.isascii():
        raise HTTPException(status_code=401, detail="Authorization must be 'Bearer <API key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return key


@api.exception_handler(DBAPIError)
async def _database_unavailable(request, error: DBAPIError) -> Response:
    """503 with Retry-After when the database cannot take the answer or the rating: nothing is
    acknowledged that was not committed, and a client retries instead of waiting."""
    message = "the database is unavailable; nothing was stored, retry"
    if openai_api.is_openai_path(request.url.path):
        return _openai_error(503, message, headers={"Retry-After": "1"})
    return Response(json.dumps({"detail": message}),
                    status_code=503, media_type="application/json", headers={"Retry-After": "1"})


REPLICA_CPUS = 1  # Ray CPUs a replica holds (one torch thread)


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    """One replica: the tokenizer and model, a DB engine, and the batched generate."""

    def __init__(self, config: dict):
        import sqlalchemy as sa
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.config = ServingConfig(**config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.config.model_path).eval()
        self.renderer = PromptRenderer(**self.config.prompt_renderer)
        # pre_ping: after a database restart, a pooled connection is tested and replaced at
        # checkout (one short round trip) instead of failing the request that drew it.
        # connect_timeout (s): a database that cannot be reached fails fast (503), never hangs.
        self.engine = sa.create_engine(_read_database_url(self.config.database_url_file),
                                       pool_size=4, pool_recycle=300,
                                       pool_pre_ping=True, connect_args={"connect_timeout": 2})
        self.token_secret = credentials.read_signing_secret(self.engine)
        self.rate_limits = RateLimits({"generate": self.config.generate_rate_limit,
                                       "feedback": self.config.feedback_rate_limit,
                                       "reviews": self.config.feedback_rate_limit})
        self.batcher = batching.BusyBatcher(self._generate_batch, self.config.max_batch_size,
                                            self.config.batch_wait_timeout_s)
        # Answers' rows are committed by whoever is first after a commit, for all that waited.
        self.request_log = batching.GroupCommit(lambda rows: traffic_log.log_requests(self.engine, rows))
        self.created = int(Path(self.config.model_path).stat().st_mtime)  # GET /v1/models' `created`
        self._streams: set[asyncio.Task] = set()  # streamed answers still generating or logging

    def _answer(self, batch: list[Ask], contexts: list[list[dict] | None]) -> tuple[list[list[int]],
                                                                                 list[generation.Answer]]:
        """A batch's prompt ids and answers, each decoded as its Ask says (greedy by default, cut
        at its own token budget): rendered as the prompt set was (rendering.py) and decoded as the
        eval report scores (generation.py). Streamed rows get their text each step."""
        ids = [generation.prompt_ids(self.tokenizer, render_prompt(
            self.renderer, ask.request.user_message(), context, self.tokenizer), self.config.seq_len)
            for ask, context in zip(batch, contexts, strict=True)]
        decodings = [ask.decoding or generation.Decoding(ask.request.max_new_tokens) for ask in batch]
        streams = [ask.stream for ask in batch]
        streamed = any(stream is not None for stream in streams)
        answers = generation.generate_batch(
            self.model, self.tokenizer, ids, decodings,
            on_text=(lambda i, text: streams[i] and streams[i].push(text)) if streamed else None,
            cancelled=(lambda i: streams[i] is not None and streams[i].cancelled) if streamed else None)
        return ids, answers

    def _answer_rows(self, batch: list[Ask]) -> list[dict]:
        """Answer a batch; one request-log row each (not yet written), in order, with the token
        counts of its usage (not logged)."""
        requests = [ask.request for ask in batch]
        contexts = [request.context() for request in requests]
        ids, answers = self._answer(batch, contexts)
        finished = time.perf_counter()
        return [{"id": ask.response_id, "version": self.config.model_version,
                 "prompt": ask.request.user_message(),
                 "context": context,
                 "response": storable_answer(answer.text).strip(),
                 "max_new_tokens": (ask.decoding or ask.request).max_new_tokens,
                 "latency": (finished - ask.started) * 1000, "api_key_id": ask.key_id,
                 "client_host": ask.client_host, "finish_reason": answer.finish_reason,
                 "prompt_tokens": len(prompt), "completion_tokens": answer.tokens}
                for ask, context, prompt, answer in zip(batch, contexts, ids, answers, strict=True)]

    async def _generate_batch(self, batch: list[Ask]) -> list[dict]:
        # In a worker thread: the event loop keeps taking requests (they queue for the next batch).
        return await asyncio.to_thread(self._answer_rows, batch)

    async def _admit(self, request: Request, endpoint: str) -> credentials.ApiKey | None:
        """Authenticate the bearer key (401 when unknown or revoked), then spend a rate budget
        (429): the key's when it authenticates, else the client host's, so that a wrong key is
        counted against its host too."""
        bearer = _bearer(request)
        key = None if bearer is None else await asyncio.to_thread(credentials.authenticate,
                                                                  self.engine, bearer)
        if key is not None:
            refusal = self.rate_limits.check(endpoint, "key", str(key.id))
        else:
            refusal = self.rate_limits.check(endpoint, "address",
                                             budget_host(request.client.host if request.client else None))
        if refusal is not None:
            raise HTTPException(
                status_code=429, headers={"Retry-After": str(refusal.retry_after_s)},
                detail=f"rate limit {refusal.limit} per {refusal.budget} reached for {endpoint}; "
                       f"retry after {refusal.retry_after_s} s")
        if bearer is not None and key is None:
            raise HTTPException(status_code=401, detail="the API key is unknown or revoked",
                                headers={"WWW-Authenticate": "Bearer"})
        return key

    async def _asker(self, request: Request) -> credentials.ApiKey | None:
        """The key of a request for an answer, admitted (`_admit`); 401 without one where the
        deployment answers only keyed requests."""
        key = await self._admit(request, "generate")
        if key is None and self.config.generate_requires_key:
            raise HTTPException(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                detail="this deployment answers only requests with an API key "
                                       "(generate_requires_key)")
        return key

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        key = await self._asker(request)
        row = await self.batcher.submit(Ask(body, time.perf_counter(), key.id if key else None,
                                            budget_host(request.client.host if request.client else None),
                                            str(uuid.uuid4())))
        # A 200 means the answer's row is committed; the model meanwhile answers the next batch.
        await self.request_log.commit([row])
        return GenerateResponse(response_id=row["id"], text=row["response"],
                                model_version=self.config.model_version, latency_ms=row["latency"],
                                feedback_token=credentials.feedback_token(self.token_secret, row["id"]))

    def _store_feedback(self, feedback: FeedbackRequest, key: credentials.ApiKey | None,
                        address: str | None) -> dict:
        response_id = str(feedback.response_id)
        served, receiver, asker_host = traffic_log.answer_receiver(self.engine, response_id)
        if not served:
            return {}
        token_valid = (None if feedback.feedback_token is None else
                       credentials.token_matches(self.token_secret, response_id, feedback.feedback_token))
        trusted = key.name if key is not None and key.role in credentials.TRUSTED_CORRECTIONS else None
        return traffic_log.store_feedback(self.engine, traffic_log.Rating(
            response_id=response_id, rating=feedback.rating, correction=feedback.correction,
            comment=feedback.comment, client_id=feedback.client_id,
            credential=credentials.judge_rating(key, response_id, receiver, token_valid, asker_host),
            review=review.initial_review(feedback.rating, feedback.correction, trusted),
            source_address=address))

    @api.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest, request: Request) -> dict:
        key = await self._admit(request, "feedback")
        address = request.client.host if request.client else None
        stored = await asyncio.to_thread(self._store_feedback, body, key, address)
        if not stored:
            raise HTTPException(status_code=404,
                                detail=f"response_id {body.response_id} was never served")
        return stored

    async def _reviewer(self, request: Request) -> credentials.ApiKey:
        key = await self._admit(request, "reviews")
        if key is None:
            raise HTTPException(status_code=401, detail="reviews need a reviewer key",
                                headers={"WWW-Authenticate": "Bearer"})
        if key.role not in credentials.REVIEWS_CORRECTIONS:
            raise HTTPException(status_code=403, detail=f"key {key.name} has role {key.role}; "
                                                        "reviews need the reviewer role")
        return key

    @api.get("/v1/reviews")
    async def reviews(self, request: Request, limit: int = 50) -> JSONResponse:
        await self._reviewer(request)
        limit = min(max(limit, 1), 200)
        frame = await asyncio.to_thread(review.pending, self.engine, limit)
        items = json.loads(frame.to_json(orient="records", date_format="iso"))
        # People's questions and corrections: never kept by a browser or proxy cache.
        return JSONResponse({"pending": items}, headers={"Cache-Control": "no-store"})

    @api.post("/v1/reviews/{feedback_id}")
    async def decide(self, feedback_id: int, body: ReviewRequest, request: Request) -> dict:
        key = await self._reviewer(request)
        try:
            decision = await asyncio.to_thread(review.decide, self.engine, feedback_id, body.decision,
                                               key.identity, body.note)
        except review.ReviewError as error:
            raise HTTPException(status_code=409, detail=str(error)) from None
        return {"feedback_id": decision.feedback_id, "review": decision.state,
                "reviewed_by": decision.reviewed_by, "reviewed_at": decision.reviewed_at.isoformat()}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: openai_api.ChatCompletionRequest, request: Request) -> Response:
        return await self._complete(body, request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, body: openai_api.CompletionRequest, request: Request) -> Response:
        return await self._complete(body, request, chat=False)

    async def _complete(self, body: openai_api.ChatCompletionRequest | openai_api.CompletionRequest,
                        request: Request, chat: bool) -> Response:
        """An OpenAI completion: admitted and validated as /v1/generate is, batched with it, and
        logged to request_log the same way; streamed as server-sent events when asked."""
        key = await self._asker(request)
        if body.model not in (self.config.model_version, openai_api.DEFAULT_MODEL_ALIAS):
            return _openai_error(404, f"the model {body.model!r} does not exist: this deployment "
                                      f"serves {self.config.model_version!r} (alias "
                                      f"{openai_api.DEFAULT_MODEL_ALIAS!r})", "model", "model_not_found")
        try:
            generate = GenerateRequest(**body.generate_fields())
        except ValidationError as error:  # the conversation's rules: turn order, the user's turn last
            detail = [{"type": e["type"], "loc": ["messages" if chat else "prompt"], "msg": e["msg"]}
                      for e in error.errors()]
            return Response(json.dumps(openai_api.validation_error(detail)[1], ensure_ascii=True),
                            status_code=400, media_type="application/json")
        decoding = body.decoding()
        response_id = str(uuid.uuid4())
        stream = openai_api.TokenStream(decoding.stop, storable_answer) if body.stream else None
        ask = Ask(generate, time.perf_counter(), key.id if key else None,
                  budget_host(request.client.host if request.client else None), response_id,
                  decoding, stream)
        token = credentials.feedback_token(self.token_secret, response_id)
        headers = {"X-Feedback-Token": token, "Cache-Control": "no-store"}
        if stream is None:
            row = await self.batcher.submit(ask)
            await self.request_log.commit([row])
            return JSONResponse(openai_api.completion(chat, row, self.config.model_version,
                                                      int(time.time()), token), headers=headers)
        answered = asyncio.create_task(self._answer_and_log(ask))
        self._streams.add(answered)  # kept until logged, even when its client has gone
        answered.add_done_callback(self._streams.discard)
        answered.add_done_callback(lambda _: stream.queue.put_nowait(openai_api.TokenStream.END))
        return StreamingResponse(self._events(chat, ask, answered, body.include_usage()),
                                 media_type="text/event-stream",
                                 headers={**headers, "X-Accel-Buffering": "no"})

    async def _answer_and_log(self, ask: Ask) -> dict:
        row = await self.batcher.submit(ask)
        await self.request_log.commit([row])
        return row

    async def _events(self, chat: bool, ask: Ask, answered: asyncio.Task, include_usage: bool):
        """The server-sent events of a streamed answer: a first chunk, a chunk per text delta as
        the batch generates it, the last with its finish_reason once the answer is logged, the
        usage chunk when asked for, then [DONE]. A client that leaves sets the stream's cancel flag:
        its row ends at the batch's next step, and is logged as cut_off."""
        stream, model, created = ask.stream, self.config.model_version, int(time.time())
        done = False
        try:
            if chat:  # the assistant's role first, as OpenAI streams it
                yield openai_api.event(openai_api.chunk(chat, ask.response_id, model, created, first=True,
                                                        with_usage=include_usage))
            while (delta := await stream.queue.get()) is not openai_api.TokenStream.END:
                yield openai_api.event(openai_api.chunk(chat, ask.response_id, model, created, delta,
                                                        with_usage=include_usage))
            try:
                row = answered.result()
            except Exception as error:  # noqa: BLE001 - the status is sent: the stream says why it ends
                done = True
                status = 503 if isinstance(error, DBAPIError) else 500
                yield openai_api.event(openai_api.error_body(
                    status, "the database is unavailable; nothing was stored, retry" if status == 503
                    else "the answer failed", code="stream_failed"))
                return
            rest = stream.rest(row["response"])
            yield openai_api.event(openai_api.chunk(chat, ask.response_id, model, created, rest or None,
                                                    finish_reason=row["finish_reason"],
                                                    with_usage=include_usage))
            if include_usage:
                yield openai_api.event(openai_api.usage_chunk(chat, ask.response_id, model, created, row))
            yield openai_api.event("[DONE]")
            done = True
        finally:
            if not done:  # the client left (Serve cancels the request): stop its row at once
                stream.cancelled = True

    def _model(self) -> dict:
        return openai_api.model_object(self.config.model_version, self.created, self.config.lineage)

    @api.get("/v1/models")
    def models(self) -> dict:
        """The served model in the OpenAI list shape; its lineage (dataset, prompt-set and
        base-model versions) on the model object."""
        return {"object": "list", "data": [self._model()]}

    @api.get("/v1/models/{model_id}")
    def model(self, model_id: str) -> Response:
        if model_id not in (self.config.model_version, openai_api.DEFAULT_MODEL_ALIAS):
            return _openai_error(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return JSONResponse(self._model())

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.config.model_version,
                "config_digest": self.config.digest()}

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers={"Content-Security-Policy": PAGE_CSP,
                                                "X-Content-Type-Options": "nosniff"})


def build_app(config: ServingConfig, max_surge_percent: int = 0) -> serve.Application:
    """The Serve application for `config` (not yet running): a bounded queue at the proxy, whose
    overflow is answered 503 with Retry-After. `max_surge_percent`: how a rollout to it replaces
    running replicas (a rollout option, not part of what a replica serves or of its digest)."""
    from ray.serve.config import BackpressureConfig

    return ModelServer.options(
        num_replicas=config.replicas, max_queued_requests=config.max_queued_requests,
        **({"max_replicas_per_node": config.max_replicas_per_node}
           if config.max_replicas_per_node else {}),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        # Above 0, a rollout starts new replicas before it stops old ones (0, Serve's default,
        # stops first: a one-replica deployment then has none for the new one's start, about 6 s
        # here, its requests queued at the proxy and 503s once the queue is full).
        max_surge_percent=max_surge_percent,
        # A replaced replica checks every 0.5 s (Serve's default 2 s) whether its last requests
        # are answered, so a swap ends sooner; its answers are never cut short.
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(asdict(config))
