"""Native routes: generate, score, tokenize, detokenize."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import Authorized, ServingDep
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
async def tokenize(body: TokenizeRequest, serving: ServingDep) -> dict:
    """Token ids of a prompt, or of chat messages in the model's template (vLLM's shape)."""
    return serving.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, serving: ServingDep) -> dict:
    """Text of a list of token ids."""
    return serving.detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(serving: ServingDep) -> dict:
    """The tokenizer's special tokens, chat template and limits, for clients that tokenize remotely."""
    return serving.tokenizer_info()
