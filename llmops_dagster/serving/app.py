"""The served model: a Ray Serve deployment with a FastAPI ingress, and its typed builder.

    POST /v1/generate  {prompt, max_new_tokens?}            -> {response_id, text, model_version, latency_ms}
    POST /v1/feedback  {response_id, rating, correction?, comment?, client_id?}
    GET  /v1/models, GET /healthz, GET / (a page to ask, read the answer and rate it)

Requests are batched with `@serve.batch` and answered by greedy decoding. Every answer goes to
`request_log` with the model version, every rating to `feedback`; all SQL is parameterized. Inputs
are validated by strict pydantic models: a bad type, size or character gets a 4xx that names the
field, never a 5xx. The deployment class is plain Python, so it builds and tests without a cluster.
"""


import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Annotated

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from llmops_dagster.serving import traffic_log
from llmops_dagster.serving.page import PAGE_HTML
from llmops_dagster.training.run_config import FinetuneSettings

MAX_PROMPT_CHARS = 2000
MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 128


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


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 48

    @field_validator("prompt")
    @classmethod
    def _prompt_storable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain more than whitespace")
        return _storable(value, "prompt")


class GenerateResponse(BaseModel):
    response_id: str
    text: str
    model_version: str
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    response_id: uuid.UUID | Annotated[str, Field(max_length=64)]
    rating: Annotated[int, Field(description="1 (good) or -1 (bad)")]
    correction: Annotated[str | None, Field(max_length=MAX_TEXT_CHARS)] = None
    comment: Annotated[str | None, Field(max_length=MAX_TEXT_CHARS)] = None
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = "anonymous"

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: int) -> int:
        if value not in (-1, 1):
            raise ValueError("rating must be 1 (good) or -1 (bad)")
        return value

    @field_validator("correction", "comment", "client_id")
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


@dataclass(frozen=True)
class ServingConfig:
    """Everything a replica needs; built by the serving_deployment asset from the registry."""

    model_version: str
    model_path: str  # merged Hugging Face folder
    prompt_template: str  # Jinja text the model was trained with; variable: prompt
    database_url: str
    lineage: dict  # dataset / prompt-set / base-model versions
    max_batch_size: int = field(default=8, metadata={"help": "Requests per @serve.batch call."})
    batch_wait_timeout_s: float = field(default=0.005, metadata={
        "help": "Longest wait of a lone request for company in its batch (s)."})
    seq_len: int = FinetuneSettings.seq_len  # prompt tokens kept: the length the model trained on


api = FastAPI(title="llmops-dagster", description="The approved model, served.")


@api.exception_handler(RequestValidationError)
async def _refuse(request, error: RequestValidationError) -> Response:
    """422 naming each bad field. FastAPI's own handler echoes the bad input back and fails with a
    500 when it cannot encode it (a lone surrogate, NaN); this one sends type, location and message
    only, ASCII-escaped, so any refused input gets a 4xx."""
    detail = [{"type": e.get("type"), "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg"))} for e in error.errors()]
    return Response(json.dumps({"detail": detail}, ensure_ascii=True), status_code=422,
                    media_type="application/json")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    """One replica: the tokenizer and model, a DB engine, and the batched generate."""

    def __init__(self, config: dict):
        import jinja2
        import sqlalchemy as sa
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.config = ServingConfig(**config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.config.model_path).eval()
        self.template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            self.config.prompt_template)
        # pool_recycle instead of a ping a checkout: one round trip less a request.
        self.engine = sa.create_engine(self.config.database_url, pool_size=4, pool_recycle=300)
        self.generate_batch.set_max_batch_size(self.config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def _answer(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
        """Greedy answers for a batch (left-padded), each cut at its own token budget."""
        import torch

        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        keep = self.config.seq_len - 1
        ids = [(bos + self.tokenizer(self.template.render(prompt=p), add_special_tokens=False)
                ["input_ids"])[-keep:] for p in prompts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=attention, max_new_tokens=max(max_new_tokens),
                do_sample=False, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad)
        return [self.tokenizer.decode(row[width: width + budget], skip_special_tokens=True).strip()
                for row, budget in zip(output, max_new_tokens, strict=True)]

    def _answer_and_log(self, batch: list[tuple[GenerateRequest, float]]) -> list[tuple[str, str, float]]:
        """Answer a batch and write its request-log rows in one transaction (one round trip a
        batch, not a request); returns (response id, text, latency ms) in order."""
        requests = [request for request, _ in batch]
        texts = self._answer([r.prompt for r in requests], [r.max_new_tokens for r in requests])
        finished = time.perf_counter()
        rows = [{"id": str(uuid.uuid4()), "version": self.config.model_version, "prompt": r.prompt,
                 "response": text, "max_new_tokens": r.max_new_tokens,
                 "latency": (finished - started) * 1000}
                for (r, started), text in zip(batch, texts, strict=True)]
        traffic_log.log_requests(self.engine, rows)
        return [(row["id"], row["response"], row["latency"]) for row in rows]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, batch: list[tuple[GenerateRequest, float]]) -> list[tuple]:
        return await asyncio.to_thread(self._answer_and_log, batch)

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        response_id, text, latency_ms = await self.generate_batch((request, time.perf_counter()))
        return GenerateResponse(response_id=response_id, text=text,
                                model_version=self.config.model_version, latency_ms=latency_ms)

    def _store_feedback(self, feedback: FeedbackRequest) -> dict:
        return traffic_log.store_feedback(self.engine, str(feedback.response_id), feedback.client_id,
                                          feedback.rating, feedback.correction, feedback.comment)

    @api.post("/v1/feedback")
    async def feedback(self, feedback: FeedbackRequest) -> dict:
        stored = await asyncio.to_thread(self._store_feedback, feedback)
        if not stored:
            raise HTTPException(status_code=404,
                                detail=f"response_id {feedback.response_id} was never served")
        return stored

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"model_version": self.config.model_version, **self.config.lineage}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.config.model_version}

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return PAGE_HTML


def build_app(config: ServingConfig, replicas: int = 1) -> serve.Application:
    """The Serve application for `config` (not yet running)."""
    return ModelServer.options(num_replicas=replicas).bind(asdict(config))
