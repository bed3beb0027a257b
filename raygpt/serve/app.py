"""The Ray Serve application: one deployment whose replicas each hold a TextGenerator behind a FastAPI app.

    POST /v1/completions   OpenAI's completions API (raygpt/serve/api.py), streamed as server-sent events
    GET  /v1/models        the checkpoint: name, step, val loss, parameters
    GET  /healthz          200 while the replica serves (never needs the API key)
    GET  /                 the web page (static/index.html; relative URLs, so any route prefix works)

Batching: each row of a request (a prompt's choice) goes to the replica's Batcher (raygpt/serve/batcher.py):
continuous batching, one forward pass per token for every row in flight, rows joining as they come.

The model is (re)loaded by ``reconfigure`` (Serve's user_config, {"checkpoint": PATH}); with follow, each
replica also looks for a better checkpoint below the run folder every serve.follow_interval_s and moves to
it. A batch keeps the generator it started with, so a move drops no request.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from raygpt.checkpoint import best_checkpoint, read_meta, resolve_checkpoint
from raygpt.config import ServeConfig
from raygpt.generate import TextGenerator, load
from raygpt.serve import api
from raygpt.serve.batcher import Batcher, Pending

PAGE = Path(__file__).parent / "static" / "index.html"
logger = logging.getLogger("ray.serve")
web = FastAPI(title="raygpt", docs_url=None, redoc_url=None, openapi_url=None)


@web.exception_handler(api.ApiError)
async def _api_error(request: Request, e: api.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="raygpt"'} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@web.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: OpenAI's error shape too
    return JSONResponse(api.ApiError(str(e.detail), status=e.status_code).body(), status_code=e.status_code)


def key_hash(key: Optional[str]) -> Optional[str]:
    """What a replica keeps of the API key: its sha256, so the key itself is in no config, log or dashboard."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def choose_checkpoint(source: Path, follow: bool) -> Path:
    """What a checkpoint or run folder serves: a run's latest checkpoint, or following it, its best one."""
    if follow and not (source / "meta.json").exists():
        return best_checkpoint(source) or resolve_checkpoint(source)
    return resolve_checkpoint(source)


@serve.deployment
@serve.ingress(web)
class Completions:
    def __init__(self, settings: dict, name: str, api_key_hash: Optional[str] = None):
        self.settings = ServeConfig(**settings)
        self.name, self.key_hash = name, api_key_hash
        self.gen: Optional[TextGenerator] = None
        self.meta: dict = {}
        self.source: Optional[str] = None  # the checkpoint or run folder of the user_config
        self.follower: Optional[asyncio.Task] = None
        self.batcher: Optional[Batcher] = None  # made in the replica's event loop (reconfigure)
        cpus = self.settings.cpus_per_replica
        if cpus is not None and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(cpus)))  # one intra-op thread per CPU the replica holds

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config: {"checkpoint": a checkpoint or run folder}. A run folder serves its latest
        checkpoint, or with serve.follow its best one, and then follows it."""
        source = str(user_config["checkpoint"])
        if self.batcher is None:
            v = self.settings
            self.batcher = Batcher(v.max_batch_size, v.batch_wait_s)
        if source != self.source:
            await self._load(choose_checkpoint(Path(source), self.settings.follow))
            self.source = source
        if self.settings.follow and self.follower is None:
            self.follower = asyncio.get_running_loop().create_task(self._follow())

    async def _load(self, path: Path) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = await asyncio.to_thread(load, path, device, True, self.settings.quantize)
        meta = {**read_meta(path), "path": str(path)}
        self.gen, self.meta = gen, meta  # batches already running keep the generator they began with
        logger.info(f"raygpt: serving {path} (step {meta['step']}, val loss {meta.get('val_loss')})")

    async def _follow(self) -> None:
        """Every serve.follow_interval_s: a better checkpoint below the followed folder is loaded and swapped
        in. A checkpoint that fails to load (still being written, say) is tried again next time."""
        while True:
            await asyncio.sleep(self.settings.follow_interval_s)
            try:
                best = await asyncio.to_thread(choose_checkpoint, Path(self.source), True)
                if str(best) != self.meta.get("path"):
                    await self._load(best)
            except (OSError, ValueError) as e:  # CheckpointError is a ValueError
                logger.warning(f"raygpt: follow: {e}")

    # ------------------------------------------------------------------ routes

    def _check_key(self, request: Request) -> None:
        """With an API key: `Authorization: Bearer KEY` (OpenAI clients), or HTTP Basic with the key as the
        password (what a browser asks for, and then sends with the page's own requests)."""
        if self.key_hash is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else None
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                key = None
        if key is None or not hmac.compare_digest(key_hash(key), self.key_hash):
            raise api.ApiError("a valid API key is required: send the header `Authorization: Bearer KEY`",
                               status=401, code="invalid_api_key")

    @web.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "step": self.meta.get("step"), "pid": os.getpid(),
                "batches": self.batcher.stats}

    @web.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check_key(request)
        return {"object": "list", "data": [api.model_card(self.name, self.gen, self.meta, self.settings.quantize)]}

    @web.get("/")
    async def page(self, request: Request) -> HTMLResponse:
        self._check_key(request)
        return HTMLResponse(PAGE.read_text())

    @web.post("/v1/completions")
    async def completions(self, request: Request):
        self._check_key(request)
        gen = self.gen
        c = api.parse_completion(await request.body(), gen, self.settings, self.name)
        c.fingerprint = f"raygpt-{os.getpid()}"
        pending = [Pending(row, gen) for row in c.rows]
        if c.stream:
            return StreamingResponse(self._events(c, pending), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(p) for p in pending))
        choices = [api.choice(i, text, finish) for i, (text, finish, _) in enumerate(results)]
        return api.response(c, choices, sum(tokens for _, _, tokens in results))

    async def _collect(self, p: Pending) -> tuple[str, Optional[str], int]:
        pieces, finish, tokens = [], None, 0
        async for piece, finish, tokens in self.batcher.decode(p):  # a cancelled request: the row leaves
            pieces.append(piece)
        return "".join(pieces), finish, tokens

    async def _events(self, c: api.Completion, pending: list[Pending]):
        """Server-sent events: a chunk for each piece of text as it is made, each row's last chunk with its
        finish_reason, then [DONE]. A client that goes away ends its rows' decoding."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, p: Pending) -> None:
            try:
                async for item in self.batcher.decode(p):
                    await queue.put((index, item))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(pending)]
        try:
            live, tokens, first = len(tasks), [0] * len(tasks), True
            while live:
                index, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                piece, finish, tokens[index] = item
                if piece or finish:
                    yield api.chunk(c, [api.choice(index, piece, finish)], warnings=c.warnings if first else None)
                    first = False
            for task in tasks:
                task.result()  # a decoding error ends the stream as an error, not as a finished answer
            if c.include_usage:
                yield api.chunk(c, [], completion_tokens=sum(tokens))
            yield api.DONE
        finally:
            for p in pending:
                p.cancelled = True
            for task in tasks:
                task.cancel()


def model_name(path: Path) -> str:
    """The model's id in the API: the run's name for a checkpoint of a run (step_N, checkpoint_N) or a run
    folder, else the checkpoint folder's own name. It stays the same when --follow moves to another step."""
    path = path.resolve()
    if (path / "meta.json").exists() and path.name.split("_")[0] in ("step", "checkpoint"):
        return path.parent.name
    return path.name


def build(args: dict) -> serve.Application:
    """The application from builder arguments (`serve run raygpt.serve:app checkpoint=PATH [KEY=VALUE ...]`,
    or a `serve deploy` config's args): checkpoint (a checkpoint or run folder; required), name, config (a
    YAML file whose serve: section applies), api_key (else RAYGPT_API_KEY), and any serve.* key by its
    short name (max_batch_size=32). Every value is checked here, before a replica starts."""
    from raygpt.config import ConfigError, load_config

    args = {k: v for k, v in dict(args).items()}
    if not args.get("checkpoint"):
        raise ConfigError("the serve application needs checkpoint=PATH (a raygpt checkpoint or run folder)")
    path = Path(os.path.expanduser(str(args.pop("checkpoint")))).resolve()
    name = args.pop("name", None) or model_name(path)
    key = args.pop("api_key", None) or os.environ.get("RAYGPT_API_KEY") or None
    config = args.pop("config", None)
    # `serve run` passes strings (read as YAML, like key=value overrides), a Python caller values
    s = load_config(config, [f"serve.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]).serve
    read_meta(choose_checkpoint(path, s.follow))  # a wrong path fails here, in one line
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus >= s.replicas
    if not (use_gpu and s.quantize == "bf16"):  # the replicas' device decides (a GPU without bf16: the replica)
        from raygpt.quantize import check_quantize

        try:
            check_quantize(s.quantize, "cuda" if use_gpu else "cpu")
        except ValueError as e:
            raise ConfigError(f"serve.{e}") from None
    from raygpt.distributed import cpu_share

    cpus = s.cpus_per_replica if s.cpus_per_replica is not None else cpu_share(s.replicas)
    settings = {**s.__dict__, "cpus_per_replica": cpus}
    return Completions.options(
        num_replicas=s.replicas, max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0},
        user_config={"checkpoint": str(path)},
    ).bind(settings, name, key_hash(key))
