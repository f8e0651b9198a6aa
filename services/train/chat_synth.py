"""`boomerang synth --chat`: conversations the teacher writes in its own chat template, as JSONL training text.

The teacher plays both sides: it writes each user turn itself (sampled after its template's user header), then
answers it; some conversations go on for a second turn, some carry another system prompt than the template's
default. A conversation whose answer runs past `max_new_tokens` is dropped, so every kept one ends as the
teacher ends an answer. Rounds are seeded by their index: a resumed run writes the same file.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.errors import TrainingConfigError
from services.family.loading import default_device, load_model, load_tokenizer, parse_dtype
from services.train.synth import SynthConfig, check_config, done_so_far, out_of_time

log = logging.getLogger(__name__)
OTHER_SYSTEM_PROMPTS = ("You are a concise assistant.", "You are a friendly tutor who explains things simply.",
                        "Answer briefly and accurately.")
USER_TOKENS = 48  # a user turn longer than this is cut off: dropped
MIN_USER_CHARS = 8
SECOND_TURN = 0.3  # share of conversations that go on for a second turn
OTHER_SYSTEM = 0.3  # share with another system prompt than the template's default
MAX_BARREN_ROUNDS = 5  # rounds in a row with no conversation kept before giving up
_MARK = "\x00user-turn\x00"


@dataclass(frozen=True)
class ChatTurns:
    """Text sampled for each prompt: the text up to its end token, and whether it reached one."""

    texts: list[str]
    ended: list[bool]


def user_header(tokenizer, history: list[dict]) -> str:
    """The template's text of `history` followed by the opening of a user turn (what the user then writes)."""
    text = tokenizer.apply_chat_template([*history, {"role": "user", "content": _MARK}], tokenize=False)
    return text[: text.index(_MARK)]


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
           end_ids: set[int]) -> ChatTurns:
    """One left-padded batch of continuations of `prompts`, each cut at its first end token."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}  # [rows, longest] each
    out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=0.95,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts, ended = [], []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():  # [rows, new]
        stops = [i for i, token in enumerate(row) if token in end_ids]
        texts.append(tokenizer.decode(row[: stops[0]] if stops else row).strip())
        ended.append(bool(stops))
    return ChatTurns(texts, ended)


def _start(rng: random.Random) -> list[dict]:
    if rng.random() < OTHER_SYSTEM:
        return [{"role": "system", "content": rng.choice(OTHER_SYSTEM_PROMPTS)}]
    return []  # the template's default system prompt


def conversation_round(model, tokenizer, config: SynthConfig, round_index: int) -> list[list[dict]]:
    """`batch_size` conversations begun; those whose turns all ended well, returned as message lists."""
    rng = random.Random(config.seed * 1_000_003 + round_index)
    torch.manual_seed(config.seed * 1_000_003 + round_index)
    end_ids = set(tokenizer.all_special_ids)
    chats = [_start(rng) for _ in range(config.batch_size)]
    turns = [2 if rng.random() < SECOND_TURN else 1 for _ in chats]
    for turn in range(max(turns)):
        live = [i for i, chat in enumerate(chats) if chat is not None and turns[i] > turn]
        if not live:
            break
        users = sample(model, tokenizer, [user_header(tokenizer, chats[i]) for i in live], USER_TOKENS, 1.0, end_ids)
        live = _extend(chats, live, users, "user", MIN_USER_CHARS)
        if not live:
            break
        prompts = [tokenizer.apply_chat_template(chats[i], tokenize=False, add_generation_prompt=True) for i in live]
        answers = sample(model, tokenizer, prompts, config.max_new_tokens, config.temperature, end_ids)
        _extend(chats, live, answers, "assistant", 1)
    return [chat for chat in chats if chat is not None]


def _extend(chats: list[list[dict] | None], live: list[int], turns: ChatTurns, role: str, min_chars: int) -> list[int]:
    """Appends each live chat's new turn; a chat whose turn did not end or is too short is dropped (None).
    Returns the chats still live."""
    kept = []
    for i, text, ended in zip(live, turns.texts, turns.ended):
        if ended and len(text) >= min_chars:
            chats[i] = [*chats[i], {"role": role, "content": text}]
            kept.append(i)
        else:
            chats[i] = None
    return kept


def synthesize_chats(config: SynthConfig) -> dict:
    """Write rounds of conversations until the token or time budget is met; returns a summary."""
    check_config(config)
    path = Path(config.out)
    device = config.device or default_device()
    tokenizer = load_tokenizer(config.teacher)
    if not tokenizer.chat_template:
        raise TrainingConfigError(f"the teacher at {config.teacher} has no chat template: synth --chat needs one")
    rounds, tokens = done_so_far(path, config)
    model = load_model(config.teacher, parse_dtype("auto", device), device)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, barren = time.monotonic(), 0
    while tokens < config.tokens and not out_of_time(config, start):
        with torch.no_grad():
            chats = conversation_round(model, tokenizer, config, rounds)
        barren = 0 if chats else barren + 1
        if barren == MAX_BARREN_ROUNDS:
            raise TrainingConfigError(f"the teacher finished no conversation in {barren} rounds in a row (its turns "
                                      f"never reached an end token): is it a chat model? try a larger --max-new-tokens")
        with open(path, "a", encoding="utf-8") as handle:
            for chat in chats:
                text = tokenizer.apply_chat_template(chat, tokenize=False)
                count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                handle.write(json.dumps({"text": text, "tokens": count, "round": rounds,
                                         "turns": sum(m["role"] == "user" for m in chat)}) + "\n")
                tokens += count
        rounds += 1
        log.info("round %d: %d of %d conversations kept, %d tokens in all, %.0f s", rounds, len(chats),
                 config.batch_size, tokens, time.monotonic() - start)
    return {"rounds": rounds, "tokens": tokens, "seconds": round(time.monotonic() - start, 1), "out": str(path)}
