"""Shared fixtures: tiny random teacher/student pairs (Llama and Qwen3) saved as HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_TEXT = (
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Hello world! The quick brown fox jumps over the lazy dog. 0123456789 "
) * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the shape of Qwen2.5's template: tools in the system turn, calls as <tool_call> JSON, results as <tool_response>
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}"
    "\n\n# Tools\n\nYou may call one or more functions.\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function call, return a "
    "json object within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and tools and loop.first %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}"
    "{%- for call in m.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>\n{% endfor %}<|im_end|>\n\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320, chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=chat_template)


def tiny_config(model_type: str, vocab_size: int, num_hidden_layers: int = 8, **overrides):
    from transformers import AutoConfig

    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=model_type == "llama", eos_token_id=2, bos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def make_pair(root: Path, model_type: str, seed: int = 0, noise: float = 0.02, chat_template: str = CHAT_TEMPLATE,
              **config) -> tuple[Path, Path]:
    """Save a random teacher and a perturbed student made from it by the default layout (`config`: fields of
    the teacher's config that differ from `tiny_config`'s)."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.family.plan import layout_from_rule
    from services.family.student_init import init_student, save_student

    tokenizer = make_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer), **config)).eval()
    layout = layout_from_rule(teacher.config.num_hidden_layers)
    student = init_student(teacher, layout)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(noise * torch.randn_like(param))
    teacher_dir, student_dir = root / "teacher", root / "student"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    save_student(student, layout, student_dir, tokenizer)
    return teacher_dir, student_dir


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_pair(request, tmp_path_factory) -> tuple[Path, Path]:
    return make_pair(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair(tmp_path_factory.mktemp("llama_only"), "llama")


@pytest.fixture(scope="session")
def tools_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A Llama pair whose chat template renders tools (as Qwen2.5's does)."""
    return make_pair(tmp_path_factory.mktemp("tools"), "llama", chat_template=HERMES_TEMPLATE,
                     max_position_embeddings=2048)  # the tools' descriptions make long prompts


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, seconds: float = 60) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def status(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        if not wait_for(lambda: status(self.url + "/ready") == 200):
            raise RuntimeError("server did not become ready")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
