"""`knowpatch serve`: the OpenAI-compatible server (`knowpatch.serve`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import KnowpatchError
from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelArgs,
    ModelOpt,
    ResidentOpt,
    StoreOpt,
    ThreadsOpt,
    app,
    err,
    open_editor,
    run_body,
    setup_logging,
)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default answers this "
                             "machine only; 0.0.0.0 exposes the server (then set --api-key)."),
    port: int = typer.Option(8000, help="TCP port."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    api_key: str | None = typer.Option(None, "--api-key", envvar="KNOWPATCH_API_KEY",
                                       help="Require `Authorization: Bearer KEY` on every "
                                       "endpoint but the playground page (or set "
                                       "KNOWPATCH_API_KEY)."),
    max_batch: int = typer.Option(64, help="Most rows (prompts × n) generated in one batch."),
    batch_window_ms: float = typer.Option(10.0, help="Milliseconds to wait for more requests "
                                          "to join a batch."),
    max_tokens: int = typer.Option(512, help="Most tokens one choice may ask for."),
    cors: list[str] | None = typer.Option(None, "--cors", help="Allowed browser origin "
                                          "(repeatable; none: no CORS headers)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
    resident: int | None = ResidentOpt,
    engine: str = typer.Option("local", help="What generates: local (knowpatch's own engine, "
                               "transformers on this process) or vllm (a vLLM server: knowpatch "
                               "routes, trains and loads patches into it; docs/serving.md)."),
    engine_url: str | None = typer.Option(None, help="--engine vllm: the vLLM OpenAI server to "
                                          "use (e.g. http://gpu-host:8000, started with "
                                          "--enable-lora); none: knowpatch starts one for the "
                                          "model on 127.0.0.1 and stops it on exit."),
    vllm_python: str | None = typer.Option(None, help="--engine vllm: the Python that runs vLLM "
                                           "(an environment of its own; default "
                                           "$KNOWPATCH_VLLM_PYTHON, else this one)."),
) -> None:
    """Serve the model over an OpenAI-compatible API, patches routed per request.

    POST /v1/completions and /v1/chat/completions take the OpenAI request (model, prompt or
    messages, max_tokens, temperature, top_p, stop, n, seed, stream) plus `patches`: "auto"
    (default: the router picks among every loaded patch), a list of patch ids (the router
    picks among exactly those) or [] (the base model). GET/POST/DELETE /v1/patches manage
    patches while serving (an edit is a background job: GET /v1/jobs/ID). The playground is
    at http://HOST:PORT/ . Every patch of the store is loaded at start.
    """
    setup_logging(verbose)
    run_body(_serve, host, port, ModelArgs(model, device, dtype, store, resident), api_key,
             max_batch, batch_window_ms, max_tokens, cors, (engine, engine_url, vllm_python))


def _serve(host, port, args: ModelArgs, api_key, max_batch, batch_window_ms, max_tokens,
           cors, engine_args) -> None:
    import uvicorn  # the server's own packages load only for `serve`

    from ..serve import ServeSettings, create_app

    for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens)):
        if value < 1:
            raise KnowpatchError(f"{name}: must be at least 1 (got {value})")
    settings = ServeSettings(api_key=api_key, max_batch=max_batch,
                             batch_window=max(0.0, batch_window_ms) / 1000, max_tokens=max_tokens,
                             cors=list(cors or []))
    engine, engine_url, vllm_python = engine_args
    if engine not in ("local", "vllm"):
        raise KnowpatchError(f"engine: must be local or vllm (got {engine!r})")
    if engine == "local" and (engine_url or vllm_python):
        raise KnowpatchError("engine_url / vllm_python: only with --engine vllm")
    editor = open_editor(args, progress=False)
    served = editor
    if engine == "vllm":
        from ..serve.engines.vllm import open_vllm_engine

        with err.status("starting vLLM…" if not engine_url else f"connecting to {engine_url}…"):
            served = open_vllm_engine(editor, url=engine_url, python=vllm_python)
    err.print(f"knowpatch: serving {args.model} ({engine} engine) on http://{host}:{port}/ "
              f"(playground) and http://{host}:{port}/v1 (API)"
              f"{'; API key required' if api_key else ''}")
    try:
        uvicorn.run(create_app(served, settings), host=host, port=port, log_level="warning")
    finally:
        if served is not editor:  # also when the server never started: no vLLM left behind
            served.stop()

