"""OpenAI-compatible routes: models, completions, chat completions."""

from __future__ import annotations

import time
from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import Authorized, EngineDep, ServingDep
from app.errors import ERRORS
from app.schemas import ChatRequest, CompletionRequest, ModelEntry, ModelList
from app.serving import Serving

router = APIRouter(prefix="/v1", dependencies=Authorized, tags=["openai"], responses=ERRORS)
STREAMING = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                   "description": "a JSON body, or server-sent events when `stream` is true"}}
STARTED = int(time.time())


SIZE_HEADER = "x-boomerang-num-layers"  # the size that served: where the server chose it, the client learns it


async def _respond(result, serving: Serving):
    """A JSON body, or an SSE stream whose first event is produced before the headers (so errors keep status)."""
    size = {SIZE_HEADER: str(serving.served_size)}
    if isinstance(result, dict):
        return JSONResponse(result, headers=size)
    first = await anext(result)

    async def events():
        yield first
        async for event in result:
            yield event

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **size})


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, serving: ServingDep) -> ModelList:
    """Every size of the family, plus the family id (an alias of the largest size)."""
    cards, limit, defaults = engine.models(), serving.context_limit(), engine.sampling_defaults()
    entries = [ModelEntry(**asdict(c), created=STARTED, root=engine.family_name, max_model_len=limit,
                          speed=serving.latency.speed(c.num_layers), sampling_defaults=defaults) for c in cards]
    largest = max(cards, key=lambda c: c.num_layers)
    entries.append(ModelEntry(**{**asdict(largest), "id": engine.family_name}, created=STARTED, root=largest.id,
                              max_model_len=limit, speed=serving.latency.speed(largest.num_layers),
                              sampling_defaults=defaults))
    return ModelList(data=entries)


@router.post("/completions", responses=STREAMING)
async def completions(body: CompletionRequest, serving: ServingDep):
    """Text completion; `echo` with `logprobs` and `max_tokens=0` scores the prompt."""
    return await _respond(await serving.completion(body), serving)


@router.post("/chat/completions", responses=STREAMING)
async def chat_completions(body: ChatRequest, serving: ServingDep):
    """Chat completion with the teacher's chat template."""
    return await _respond(await serving.chat(body), serving)
