"""Chat quality per size: what users send an Instruct model, answered by every size of the family.

The prompts are written by hand for this evaluation (everyday requests, none of them in any training data: the
training conversations' user turns are written by the teacher itself). Per size:
- answer perplexity: the teacher's own greedy answers, teacher-forced under the size (answer tokens only);
- degenerate-answer rate: empty, the system prompt recited, the question echoed, or a loop of one phrase;
- agreement: share of prompts whose greedy answer starts with the teacher's first `AGREE_TOKENS` tokens;
- multiple choice: questions with one right option among several, scored by the option's log-likelihood as the
  assistant's answer (as the paper scores its classification tasks).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.engine.interface import SamplingParams
from services.engine.logit_processors import apply_logit_processors
from services.eval.baselines import LABELS
from services.family import Family

CHAT_PROMPTS = (
    "What is the capital of France?", "Name three primary colors.", "Translate 'good morning' to Spanish.",
    "How many days are in a week?", "Give me one tip for staying focused while studying.",
    "What is the boiling point of water in Celsius?", "Write a short sentence about the ocean.",
    "Why do we need to sleep?", "Suggest a name for a pet cat.", "What is 7 plus 5?",
    "List two fruits that are yellow.", "How do I make a cup of tea?", "What does a bee make?",
    "Tell me a fun fact about the Moon.", "What is the opposite of 'cold'?", "Which planet is known as the Red Planet?",
    "Describe a rainy day in one sentence.", "What should I pack for a day at the beach?",
    "Explain what a verb is.", "How can I be more polite in emails?", "What animal says 'moo'?",
    "Recommend a healthy breakfast.", "What is the largest ocean on Earth?", "How do plants get energy?",
)
# (question, options, index of the right one)
MULTIPLE_CHOICE = (
    ("What is the capital of France?", ("Paris", "Berlin", "Madrid"), 0),
    ("Which planet is closest to the Sun?", ("Jupiter", "Mercury", "Neptune"), 1),
    ("What color is the sky on a clear day?", ("Green", "Red", "Blue"), 2),
    ("How many legs does a spider have?", ("Eight", "Six", "Four"), 0),
    ("What do bees make?", ("Milk", "Honey", "Silk"), 1),
    ("What is frozen water called?", ("Steam", "Sand", "Ice"), 2),
    ("Which animal is known as the king of the jungle?", ("The lion", "The rabbit", "The goldfish"), 0),
    ("What is 2 plus 2?", ("Five", "Four", "Three"), 1),
    ("Which season comes after winter?", ("Autumn", "Summer", "Spring"), 2),
    ("What do you use to write on a blackboard?", ("Chalk", "A spoon", "A pillow"), 0),
    ("Which gas do plants take in from the air?", ("Helium", "Carbon dioxide", "Neon"), 1),
    ("What is the largest mammal?", ("The mouse", "The horse", "The blue whale"), 2),
    ("Which organ pumps blood through the body?", ("The heart", "The liver", "The lungs"), 0),
    ("What is the opposite of 'up'?", ("Left", "Down", "Over"), 1),
    ("Which language is mostly spoken in Brazil?", ("Spanish", "French", "Portuguese"), 2),
    ("How many hours are in a day?", ("Twenty-four", "Twelve", "Sixty"), 0),
)
AGREE_TOKENS = 8
LOOP_NGRAM, LOOP_REPEATS = 4, 3


def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ServedAdjustments:
    """A transformers logits processor applying the server's own logit processors (`engine/logit_processors`)
    with `defaults` (penalties), so the eval decodes as the server decodes a request that sets none."""

    def __init__(self, defaults: dict, prompts: list[list[int]], longest: int, end_ids: set[int]):
        self.params = SamplingParams(**defaults)
        self.prompts, self.longest, self.end_ids = prompts, longest, end_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.longest:].tolist()  # [batch, new]
        return apply_logit_processors(scores, [self.params] * len(self.prompts), self.prompts, generated,
                                      self.end_ids)


@torch.inference_mode()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   end_ids: set[int], defaults: dict | None = None) -> list[list[int]]:
    """Each prompt's greedy answer (token ids, cut before its end token), one left-padded batch; `defaults`:
    the pair's sampling defaults, applied as the server applies them."""
    longest = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])  # [batch, longest]
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])  # [batch, longest]
    adjust = [ServedAdjustments(defaults, prompts, longest, end_ids)] if defaults else []
    out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=sorted(end_ids), logits_processor=adjust)
    answers = []
    for row in out[:, longest:].tolist():  # [batch, new]
        stops = [i for i, token in enumerate(row) if token in end_ids]
        answers.append(row[: stops[0]] if stops else row)
    return answers


@torch.inference_mode()
def continuation_logprobs(model: nn.Module, prompts: list[list[int]], continuations: list[list[int]],
                          pad_id: int) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after its prompt (right-padded batch)."""
    rows = [p + c for p, c in zip(prompts, continuations)]
    longest = max(map(len, rows))
    input_ids = torch.tensor([r + [pad_id] * (longest - len(r)) for r in rows])  # [batch, longest]
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])  # [batch, longest]
    logprobs = torch.log_softmax(model(input_ids, attention_mask=mask, use_cache=False).logits.float(), -1)
    totals = []
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)  # predict each token
        totals.append(float(logprobs[row, positions, torch.tensor(continuation)].sum()))
    return totals


def degenerate(answer: str, question: str, system_prompt: str) -> str | None:
    """Why an answer is degenerate (empty, system, echo, loop), or None for a real answer."""
    text = answer.strip()
    if not text:
        return "empty"
    words = re.findall(r"\w+", text.lower())
    if system_prompt and system_prompt.lower()[:30] in text.lower():
        return "system"
    question_words = re.findall(r"\w+", question.lower())
    if words[: len(question_words)] == question_words:
        return "echo"
    grams = [tuple(words[i:i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
    if grams and max(grams.count(g) for g in set(grams)) >= LOOP_REPEATS:
        return "loop"
    return None


def default_system_prompt(tokenizer) -> str:
    """The system text the template adds when a conversation has none ('' when it adds none)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    before = text[: text.index("\x00")]
    match = re.search(r"system\s*\n(.*?)<", before, re.S)
    return match.group(1).strip() if match else ""


@dataclass(frozen=True)
class ChatPrompts:
    """Prompts as a size receives them, with what reading its answers needs."""

    questions: tuple[str, ...]
    ids: list[list[int]]  # each question in the chat template, up to the assistant's turn
    end_ids: set[int]
    pad_id: int
    system: str  # the template's default system prompt

    @classmethod
    def of(cls, tokenizer, questions: tuple[str, ...]) -> ChatPrompts:
        end_ids = {i for i in (tokenizer.eos_token_id, *tokenizer.all_special_ids) if i is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
        return cls(questions, [_ids(tokenizer, prompt_text(tokenizer, q)) for q in questions], end_ids, pad,
                   default_system_prompt(tokenizer))


def answer(model: nn.Module, tokenizer, prompts: ChatPrompts, max_new_tokens: int, defaults: dict | None = None):
    """Greedy answers (token ids), their text, and what is degenerate about each (None: a real answer)."""
    answers = greedy_answers(model, tokenizer, prompts.ids, max_new_tokens, prompts.end_ids, defaults)
    texts = [tokenizer.decode(a) for a in answers]
    return answers, texts, [degenerate(t, q, prompts.system) for t, q in zip(texts, prompts.questions)]


def evaluate_chat(family: Family, max_new_tokens: int = 40, prompts: tuple[str, ...] = CHAT_PROMPTS,
                  sizes: list[int] | None = None, progress: bool = True,
                  variant: Callable[[int], nn.Module] | None = None) -> dict:
    """Chat quality of every size (or `sizes`) against the teacher's own answers. Answers are decoded as the
    server decodes a request that sets nothing (greedy, with the pair's sampling defaults); where the pair has
    defaults, the degenerate rate without them is reported beside. Answer perplexity is always over the
    teacher's plain greedy answers (its own distribution, comparable across pairs). `variant` builds the model
    of a size (default: the family's; a baseline passes its pruned teacher)."""
    from tqdm import tqdm

    tokenizer = family.tokenizer
    chat = ChatPrompts.of(tokenizer, prompts)
    defaults = family.sampling_defaults
    teacher = family.variant(max(family.sizes))
    reference, _, _ = answer(teacher, tokenizer, chat, max_new_tokens)
    served_reference = answer(teacher, tokenizer, chat, max_new_tokens, defaults)[0] if defaults else reference
    scored = [(p, a) for p, a in zip(chat.ids, reference) if a]
    choices = [(_ids(tokenizer, prompt_text(tokenizer, q)), [_ids(tokenizer, o) for o in options], right)
               for q, options, right in MULTIPLE_CHOICE]
    results = []
    for n in tqdm(sizes or family.sizes, desc="chat", disable=not progress):
        model = (variant or family.variant)(n)
        answers, texts, kinds = answer(model, tokenizer, chat, max_new_tokens, defaults)
        plain_kinds = answer(model, tokenizer, chat, max_new_tokens)[2] if defaults else kinds
        nll = -sum(continuation_logprobs(model, [p for p, _ in scored], [a for _, a in scored], chat.pad_id))
        results.append({
            "num_layers": n,
            "answer_perplexity": math.exp(nll / sum(len(a) for _, a in scored)),
            "degenerate_rate": sum(k is not None for k in kinds) / len(kinds),
            "degenerate": {kind: kinds.count(kind) for kind in ("empty", "system", "echo", "loop")},
            "degenerate_prompts": [i for i, kind in enumerate(kinds) if kind is not None],
            "degenerate_rate_without_defaults": sum(k is not None for k in plain_kinds) / len(plain_kinds),
            "agreement": sum(a[:AGREE_TOKENS] == r[:AGREE_TOKENS]
                             for a, r in zip(answers, served_reference)) / len(answers),
            "multiple_choice_accuracy": _accuracy(model, choices, chat.pad_id),
            "examples": dict(zip(prompts[:3], texts[:3])),
        })
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "multiple_choice": len(MULTIPLE_CHOICE),
            "system_prompt": chat.system, "sampling_defaults": dict(defaults), "sizes": results}


def _accuracy(model: nn.Module, choices: list, pad: int) -> float:
    right = 0
    for prompt, options, answer in choices:
        scores = continuation_logprobs(model, [prompt] * len(options), options, pad)
        right += max(range(len(options)), key=scores.__getitem__) == answer
    return right / len(choices)


def chat_quality(row: dict) -> dict:
    """What the manifest and `/v1/models` carry of one size's chat measurements."""
    rounded = {key: round(row[key], 4) for key in ("answer_perplexity", "degenerate_rate", "agreement",
                                                     "multiple_choice_accuracy", "degenerate_rate_without_defaults")}
    return {**rounded, "degenerate_prompts": row["degenerate_prompts"]}


def markdown_table(report: dict) -> str:
    lines = ["| layers | answer ppl | Δ vs n-1 | degenerate | empty / system / echo / loop | degenerate, plain "
             "greedy | agreement | multiple choice |", "|---|---|---|---|---|---|---|---|"]
    previous = None
    for row in report["sizes"]:
        ppl = row["answer_perplexity"]
        change = f"{(ppl / previous - 1) * 100:+.1f}%" if previous else ""
        kinds = " / ".join(str(row["degenerate"][k]) for k in ("empty", "system", "echo", "loop"))
        lines.append(f"| {row['num_layers']} | {ppl:.2f} | {change} | {row['degenerate_rate']:.0%} | {kinds} | "
                     f"{row['degenerate_rate_without_defaults']:.0%} | {row['agreement']:.0%} | "
                     f"{row['multiple_choice_accuracy']:.0%} |")
        previous = ppl
    return "\n".join(lines) + "\n"


def write_chat_report(report: dict, out_dir: Path, name: str = "chat") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    sections = [markdown_table(report)] + [
        f"\n### {LABELS.get(baseline, baseline)}\n\n" + markdown_table({"sizes": rows})
        for baseline, rows in report.get("baselines", {}).items()]
    (out_dir / f"{name}.md").write_text("".join(sections))
