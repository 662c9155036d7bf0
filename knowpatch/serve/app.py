"""`knowpatch serve`: an OpenAI-compatible HTTP API over one `Engine`.

    app = create_app(Editor.from_pretrained(), ServeSettings(api_key="secret"))

`/v1/completions` and `/v1/chat/completions` take the OpenAI request shape plus `patches`
("auto": the router picks among every loaded patch; a list of ids: the router picks among
exactly those; []: the base model) and say in each choice's `knowpatch.patches` and in the
`x-knowpatch-patches` header which patches served it. `/v1/patches` lists, adds (an edit
as a background job), loads and removes patches while the server runs. FastAPI does the
HTTP; batching, routing and decoding are the engine's (`engine.Engine`; an `Editor` is
served by `engines.local.LocalEngine`); this file is the endpoints and their checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..editor import Editor
from ..errors import KnowpatchError
from .engine import Engine, Generation
from .engines.local import LocalEngine
from .errors import ApiError, check_id, error_body, from_knowpatch
from .patches import PatchService
from .reply import Reply
from .shapes import ChatBody, CompletionBody, RouteBody, Sampling

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_batch: int = 64
    batch_window: float = 0.01  # seconds the engine waits for more requests to batch
    max_tokens: int = 512  # the most tokens one choice may ask for
    max_n: int = 8
    cors: list[str] = field(default_factory=list)  # allowed origins; empty: no CORS headers
    served_name: str | None = None  # the base model's id in the API (default: the engine's)


def create_app(engine: Engine | Editor, settings: ServeSettings | None = None) -> FastAPI:
    """The app over `engine` (an `Editor` is served by the local engine)."""
    settings = settings or ServeSettings()
    if isinstance(engine, Editor):
        engine = LocalEngine(engine, max_batch=settings.max_batch,
                             batch_window=settings.batch_window)
    service = PatchService(engine)

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
    api = Api(engine, service, settings)
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

    def __init__(self, engine: Engine, service: PatchService, settings: ServeSettings):
        self.engine, self.service, self.settings = engine, service, settings
        self.name = settings.served_name or engine.model_name
        self.context = engine.context

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
        loaded = self.service.loaded_ids()
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
        tok = self.engine.tokenizer
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
        stated = await self.stated(body, texts)  # in-context patches: the fact before the prompt
        texts = [f"{s} {t}" if s else t for s, t in zip(stated, texts)]
        return await self.serve(body, texts, chat=False)

    async def stated(self, body: Sampling, texts: list[str]) -> list[str]:
        """The statements of the in-context patches each text fires ("" for none)."""
        patches = self.patches_of(body)
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.engine.statements(texts, patches))

    async def chat(self, body: ChatBody) -> Any:
        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        asked = [m["content"] for m in messages if m["role"] == "user"][-1:]
        stated = (await self.stated(body, asked))[0] if asked else ""
        if stated:  # in-context patches: the fact in the system message
            system = next((m for m in messages if m["role"] in ("system", "developer")), None)
            if system is None:
                messages.insert(0, {"role": "system", "content": stated})
            else:
                system["content"] = f"{stated}\n{system['content']}"
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=True)
        except Exception as exc:  # a template that rejects the conversation
            raise ApiError(400, f"messages: the chat template rejects them ({exc})", "messages") from None
        return await self.serve(body, [text], chat=True)

    async def route(self, body: RouteBody) -> dict:
        """How the router decides for one prompt: fired patches and the best candidates' scores."""
        patches = self.patches_of(body)
        route = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.engine.route(body.prompt, patches))
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
