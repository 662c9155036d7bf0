"""`knowpatch serve`: an OpenAI-compatible HTTP API over one `Editor`.

    app = create_app(Editor.from_pretrained(), ServeSettings(api_key="secret"))

`/v1/completions` and `/v1/chat/completions` take the OpenAI request shape plus `patches`
("auto": the router picks among every loaded patch; a list of ids: the router picks among
exactly those; []: the base model) and say in each choice's `knowpatch.patches` and in the
`x-knowpatch-patches` header which patches served it. `/v1/patches` lists, adds (an edit
as a background job), loads and removes patches while the server runs. FastAPI does the
HTTP; the batching and routing is `serving.Engine`; this file is request shapes and checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .editor import Editor
from .errors import KnowpatchError
from .server_patches import ApiError, PatchService, check_id, error_body, from_knowpatch
from .serving import Engine, Generation

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_batch: int = 64
    batch_window: float = 0.01  # seconds the engine waits for more requests to batch
    max_tokens: int = 512  # the most tokens one choice may ask for
    max_n: int = 8
    cors: list[str] = field(default_factory=list)  # allowed origins; empty: no CORS headers
    served_name: str | None = None  # the base model's id in the API (default: the editor's)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the OpenAI API not used here

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    patches: Literal["auto"] | list[str] = "auto"


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class RouteBody(BaseModel):
    prompt: str
    patches: Literal["auto"] | list[str] = "auto"


def create_app(editor: Editor, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    engine = Engine(editor, max_batch=settings.max_batch, batch_window=settings.batch_window)
    service = PatchService(editor, engine)
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        loop = asyncio.get_running_loop()
        engine.start()
        await loop.run_in_executor(None, service.load_store)
        yield
        await loop.run_in_executor(None, engine.stop)

    app = FastAPI(title="knowpatch", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.service, app.state.settings = engine, service, settings
    api = Api(editor, engine, service, settings)
    install_errors(app)
    install_auth(app, settings)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-knowpatch-patches"])
    api.mount(app)
    return app


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.param, exc.kind), status_code=exc.status)

    @app.exception_handler(KnowpatchError)
    async def bad_input(_request: Request, exc: KnowpatchError) -> JSONResponse:
        err = from_knowpatch(exc)
        return JSONResponse(error_body(err.message, err.param, err.kind), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"body: malformed JSON ({first.get('msg', '')})", None,
                                          "invalid_request_error"), status_code=400)
        param = ".".join(loc) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param, "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), None, "invalid_request_error"),
                            status_code=exc.status_code)


def install_auth(app: FastAPI, settings: ServeSettings) -> None:
    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.url.path != "/" and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer "
                                               "KEY)", None, "authentication_error",
                                               "invalid_api_key"), status_code=401)
        return await call_next(request)


class Api:
    """The endpoints; each checks its input and hands the model work to the engine."""

    def __init__(self, editor: Editor, engine: Engine, service: PatchService, settings: ServeSettings):
        self.editor, self.engine, self.service, self.settings = editor, engine, service, settings
        self.name = settings.served_name or editor.model_name
        config = editor.model.config
        self.context = getattr(config, "max_position_embeddings", None) or 2048

    def mount(self, app: FastAPI) -> None:
        app.get("/", include_in_schema=False)(self.playground)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        app.get("/v1/models")(self.models)
        app.post("/v1/route")(self.route)
        self.service.mount(app)

    async def playground(self) -> HTMLResponse:
        page = Path(__file__).with_name("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", self.name))

    async def models(self) -> dict:
        now = int(time.time())
        data = [{"id": self.name, "object": "model", "created": now, "owned_by": "knowpatch"}]
        data += [{"id": p["id"], "object": "model", "created": now, "owned_by": "knowpatch",
                  "parent": self.name} for p in self.service.snapshot()]
        return {"object": "list", "data": data}

    def patches_of(self, body: Sampling | RouteBody) -> list[str] | None:
        """The candidate patches of a request (None: every loaded one, routed)."""
        loaded = {p["id"] for p in self.service.snapshot()}
        model = getattr(body, "model", self.name)
        if model != self.name and model not in loaded:
            raise ApiError(404, f"model: no model or loaded patch {model!r} (GET /v1/models "
                           "lists them)", "model", "not_found_error")
        if body.patches == "auto":
            return None if model == self.name else [model]
        for i, p in enumerate(body.patches):
            check_id(p, f"patches.{i}")
            if p not in loaded:
                raise ApiError(400, f"patches.{i}: no loaded patch {p!r}", f"patches.{i}")
        return list(body.patches)

    def rows_of(self, body: Sampling, texts: list[str], chat: bool) -> tuple[list[list[int]], int]:
        """Token ids of each choice, and the token budget, checked against the limits."""
        limit = self.settings.max_tokens
        wanted = body.max_completion_tokens or body.max_tokens or (16 if not chat else min(256, limit))
        if wanted > limit:
            raise ApiError(400, f"max_tokens: {wanted} is over this server's limit of {limit}",
                           "max_tokens")
        if body.n > self.settings.max_n:
            raise ApiError(400, f"n: at most {self.settings.max_n} choices", "n")
        tok = self.editor.tokenizer
        rows = []
        for i, text in enumerate(texts):
            field_name = "messages" if chat else ("prompt" if len(texts) == 1 else f"prompt.{i}")
            if not text.strip():
                raise ApiError(400, f"{field_name}: must not be empty", field_name)
            ids = tok(text, add_special_tokens=not chat)["input_ids"]
            if len(ids) + wanted > self.context:
                raise ApiError(400, f"{field_name}: {len(ids)} tokens + max_tokens {wanted} exceed "
                               f"the model's context of {self.context} tokens", field_name)
            rows += [ids] * body.n
        return rows, wanted

    async def completions(self, body: CompletionBody) -> Any:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: at least one prompt is needed", "prompt")
        return await self.serve(body, texts, chat=False)

    async def chat(self, body: ChatBody) -> Any:
        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        try:
            text = self.editor.tokenizer.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=True)
        except Exception as exc:  # a template that rejects the conversation
            raise ApiError(400, f"messages: the chat template rejects them ({exc})", "messages") from None
        return await self.serve(body, [text], chat=True)

    async def route(self, body: RouteBody) -> dict:
        """How the router decides for one prompt: fired patches and the best candidates' scores."""
        patches = self.patches_of(body)
        routes = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.engine.call(lambda: self.editor.route(body.prompt, patches)))
        route = routes[0]
        return {"fired": route.fired, "scores": {k: round(v, 4) for k, v in route.scores.items()},
                "superseded": route.superseded}

    async def serve(self, body: Sampling, texts: list[str], chat: bool) -> Any:
        patches = self.patches_of(body)
        rows, budget = self.rows_of(body, texts, chat)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        gen = Generation(rows, budget, lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                         temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed,
                         patches=patches)
        self.engine.submit(gen)
        reply = Reply(chat, self.name, len(rows), sum(len(r) for r in rows[:: body.n]))
        if body.stream:
            first = await events.get()
            return StreamingResponse(reply.stream(first, events), media_type="text/event-stream",
                                     headers={"x-knowpatch-patches": ",".join(first[3]),
                                              "cache-control": "no-cache"})
        return await reply.whole(events)


class Reply:
    """The OpenAI response of one request, from the engine's events."""

    def __init__(self, chat: bool, model: str, n: int, prompt_tokens: int):
        self.chat, self.model, self.n, self.prompt_tokens = chat, model, n, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.fired: list[list[str]] = [[] for _ in range(n)]
        self.tokens = [0] * n

    def take(self, event: tuple) -> None:
        choice, text, reason, fired, tokens = event
        self.texts[choice] += text
        self.fired[choice], self.tokens[choice] = list(fired), tokens
        if reason is not None:
            self.finish[choice] = reason
            if reason.startswith("error:"):
                raise ApiError(500, f"generation failed: {reason[6:].strip()}", None, "server_error")

    async def whole(self, events: asyncio.Queue) -> JSONResponse:
        while any(f is None for f in self.finish):
            self.take(await events.get())
        choices = []
        for i in range(self.n):
            body = ({"message": {"role": "assistant", "content": self.texts[i]}} if self.chat
                    else {"text": self.texts[i], "logprobs": None})
            choices.append({"index": i, **body, "finish_reason": self.finish[i],
                            "knowpatch": {"patches": self.fired[i]}})
        tokens = sum(self.tokens)
        out = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices,
               "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                         "total_tokens": self.prompt_tokens + tokens}}
        fired = sorted({p for f in self.fired for p in f})
        return JSONResponse(out, headers={"x-knowpatch-patches": ",".join(fired)})

    def chunk(self, event: tuple) -> str:
        choice, text, reason, fired, _tokens = event
        if self.chat:
            delta = {"role": "assistant", "content": text} if text or reason is None else {}
            item = {"index": choice, "delta": delta, "finish_reason": reason}
        else:
            item = {"index": choice, "text": text, "logprobs": None, "finish_reason": reason}
        item["knowpatch"] = {"patches": list(fired)}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [item]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, first: tuple, events: asyncio.Queue):
        event = first
        while True:
            choice, _text, reason, _fired, _tokens = event
            if reason is not None and reason.startswith("error:"):
                yield f"data: {json.dumps(error_body(reason, None, 'server_error'))}\n\n"
                return
            yield self.chunk(event)
            if reason is not None:
                self.finish[choice] = reason
            if all(f is not None for f in self.finish):
                yield "data: [DONE]\n\n"
                return
            event = await events.get()


class InThread:
    """An app served by uvicorn on a thread of this process, on a free loopback port (for
    `bench-serve` and the tests: a real HTTP server without a subprocess)."""

    def __init__(self, app: FastAPI, timeout: float = 60.0):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app, self.base = app, f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
