"""Native routes: generate, score, tokenize, detokenize."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import Authorized, EngineDep, ServingDep
from app.errors import ERRORS
from app.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(dependencies=Authorized, tags=["native"], responses=ERRORS)


@router.post("/v1/generate")
async def generate(body: GenerateRequest, serving: ServingDep) -> dict:
    """Generate text from a prompt with the chosen size."""
    return await serving.generate(body)


@router.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, serving: ServingDep) -> dict:
    """Per-token log-probabilities, their total, and the perplexity of a text."""
    return await serving.score(body)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, engine: EngineDep) -> TokenizeResponse:
    """Token ids of a text (no special tokens added)."""
    tokens = engine.tokenize(body.text)
    return TokenizeResponse(tokens=tokens, count=len(tokens))


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    """Text of a list of token ids."""
    return DetokenizeResponse(text=engine.detokenize(body.tokens))
