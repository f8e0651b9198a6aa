"""`boomerang synth --chat`: conversations the teacher writes in its own chat template, as JSONL training text.

The teacher plays both sides: it writes each user turn itself (sampled after its template's user header), then
answers it; some conversations go on for a second turn, some carry another system prompt than the template's
default. A conversation whose user turn never ends is dropped; an answer that runs past `max_new_tokens` is
kept as it was cut and ends its conversation: the trainer distils the teacher's distribution at every position,
so a cut answer teaches as much per token as a finished one. Rounds are seeded by their index: a resumed run
writes the same file.

With `answer_num_layers`, the answers are written by those sizes of the family instead (the teacher still writes
the user turns): the student's own answers, loops and all, on which the trainer then distils the teacher's
distribution (on-policy distillation), so the student learns what the teacher would do where it goes wrong.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.errors import TrainingConfigError
from services.family import load_family
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


@dataclass
class Conversation:
    messages: list[dict]
    turns: int  # user turns wanted
    answerer: int = 0  # which model writes the answers
    cut: bool = False  # its last answer ran out of tokens before the teacher ended it
    dropped: bool = False  # a user turn never ended or was too short


def _pick(rng: random.Random, count: int) -> int:
    return rng.randrange(count) if count > 1 else 0  # one writer draws nothing: the same file as before


def answer_turns(answerers: list, chats: list[Conversation], tokenizer, config: SynthConfig,
                 end_ids: set[int]) -> None:
    """Each live conversation answered by its own answerer (one batch per answerer); marks cut answers."""
    for index, model in enumerate(answerers):
        group = [chat for chat in chats if chat.answerer == index]
        if not group:
            continue
        prompts = [tokenizer.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True) for c in group]
        answers = sample(model, tokenizer, prompts, config.max_new_tokens, config.temperature, end_ids)
        for chat, text, ended in zip(group, answers.texts, answers.ended):
            chat.messages.append({"role": "assistant", "content": text})
            chat.cut = not ended


def conversation_round(model, tokenizer, config: SynthConfig, round_index: int,
                       answerers: list | None = None) -> list[Conversation]:
    """`batch_size` conversations begun; those whose user turns all ended, returned."""
    rng = random.Random(config.seed * 1_000_003 + round_index)
    torch.manual_seed(config.seed * 1_000_003 + round_index)
    end_ids = set(tokenizer.all_special_ids)
    answerers = answerers or [model]
    chats = [Conversation(_start(rng), 2 if rng.random() < SECOND_TURN else 1, _pick(rng, len(answerers)))
             for _ in range(config.batch_size)]
    for turn in range(max(chat.turns for chat in chats)):
        live = [chat for chat in chats if not (chat.dropped or chat.cut) and chat.turns > turn]
        if not live:
            break
        users = sample(model, tokenizer, [user_header(tokenizer, c.messages) for c in live], USER_TOKENS, 1.0, end_ids)
        for chat, text, ended in zip(live, users.texts, users.ended):
            chat.dropped = not ended or len(text) < MIN_USER_CHARS
            chat.messages.append({"role": "user", "content": text})
        answer_turns(answerers, [chat for chat in live if not chat.dropped], tokenizer, config, end_ids)
    return [chat for chat in chats if not chat.dropped]


def render(tokenizer, chat: Conversation) -> str:
    """The conversation in the template; a cut answer without the end-of-turn text the teacher never wrote."""
    text = tokenizer.apply_chat_template(chat.messages, tokenize=False)
    if chat.cut:
        last = chat.messages[-1]["content"]
        text = text[: text.rindex(last) + len(last)]
    return text


def load_writers(config: SynthConfig, device: str) -> tuple[nn.Module, list[nn.Module] | None]:
    """The model writing user turns, and those writing answers (None: the same one)."""
    if not config.answer_num_layers:
        return load_model(config.teacher, parse_dtype("auto", device), device), None
    family = load_family(pair=config.pair, device=device)
    for n in config.answer_num_layers:
        family.plan(n)  # an unknown size stops here, with the family's sizes
    return family.variant(max(family.sizes)), [family.variant(n) for n in config.answer_num_layers]


def synthesize_chats(config: SynthConfig) -> dict:
    """Write rounds of conversations until the token or time budget is met; returns a summary."""
    check_config(config)
    path = Path(config.out)
    device = config.device or default_device()
    tokenizer = load_tokenizer(config.teacher)
    if not tokenizer.chat_template:
        raise TrainingConfigError(f"the teacher at {config.teacher} has no chat template: synth --chat needs one")
    rounds, tokens = done_so_far(path, config)
    model, answerers = load_writers(config, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, barren = time.monotonic(), 0
    while tokens < config.tokens and not out_of_time(config, start):
        with torch.no_grad():
            chats = conversation_round(model, tokenizer, config, rounds, answerers)
        barren = 0 if chats else barren + 1
        if barren == MAX_BARREN_ROUNDS:
            raise TrainingConfigError(f"the teacher finished no conversation in {barren} rounds in a row (its turns "
                                      f"never reached an end token): is it a chat model? try a larger --max-new-tokens")
        with open(path, "a", encoding="utf-8") as handle:
            for chat in chats:
                text = render(tokenizer, chat)
                count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                row = {"text": text, "tokens": count, "round": rounds, "cut": chat.cut,
                       "turns": sum(m["role"] == "user" for m in chat.messages)}
                if config.answer_num_layers:
                    row["answer_num_layers"] = config.answer_num_layers[chat.answerer]
                handle.write(json.dumps(row) + "\n")
                tokens += count
        rounds += 1
        log.info("round %d: %d of %d conversations kept, %d tokens in all, %.0f s", rounds, len(chats),
                 config.batch_size, tokens, time.monotonic() - start)
    return {"rounds": rounds, "tokens": tokens, "seconds": round(time.monotonic() - start, 1), "out": str(path)}
