"""The playground at `/`: served, public and self-contained (no browser needed), then driven in a real Chromium
(Debian's, through Playwright; no browser download) against a real server on the tiny pair."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.playground import ASSETS, FOLDER
from app.settings import Settings
from tests.app.fake_engine import FakeEngine
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "playground-key"
MAX_PAGE_BYTES = 150 * 1024
# the SVG namespace is a name that createElementNS and an .svg file must spell out; nothing ever fetches it
NOT_FETCHED = {"http://www.w3.org/2000/svg"}


def fake_app(**settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), engine_factory=lambda s, m: FakeEngine()))


# ---------- without a browser ----------

def test_the_page_and_its_assets_are_public_and_locked_to_this_origin():
    with fake_app(api_keys=[KEY]) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert directives["default-src"] == "'self'"
        for name, value in directives.items():  # every source list allows this origin at most
            assert value in ("'self'", "'none'"), (name, value)
        referenced = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
        assert sorted(referenced) == sorted(f"/playground/{name}" for name in ASSETS)
        kinds = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
        for path in referenced:
            asset = client.get(path)
            assert asset.status_code == 200, path
            assert asset.headers["content-type"].startswith(kinds[Path(path).suffix])
            assert asset.content == (FOLDER / Path(path).name).read_bytes()
        assert client.get("/playground/../settings.py").status_code == 404
        assert client.get("/v1/models").status_code == 401  # the page is public, the API behind it is not
        schema_paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in schema_paths and not any(p.startswith("/playground") for p in schema_paths)


def test_no_playground_turns_the_page_off():
    import argparse

    from app.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {k: v for k, v in vars(parser.parse_args(["--no-playground"])).items() if v is not None}
    assert flags == {"playground": False}
    with fake_app(**flags) as client:
        assert client.get("/").status_code == 404
        assert client.get("/playground/app.js").status_code == 404
        assert client.get("/health").status_code == 200
    assert Settings().playground is True


def test_the_page_is_small_and_shipped_in_the_package():
    files = sorted(p for p in FOLDER.iterdir() if p.is_file())
    assert {p.name for p in files} == {"index.html", *ASSETS}
    assert sum(p.stat().st_size for p in files) <= MAX_PAGE_BYTES
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    for path in files:  # a file the package data leaves out would be missing from an installed server
        assert any(fnmatch.fnmatch(f"playground/{path.name}", glob) for glob in globs), path.name


def test_the_page_names_no_other_host():
    for path in FOLDER.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"'<>)`]+", text)) - NOT_FETCHED
        assert not urls, (path.name, urls)
        assert not re.search(r"""(?:src|href|action)\s*=\s*["']//""", text), path.name  # protocol-relative
        assert "@import" not in text and "url(" not in text, path.name


# ---------- in a real browser ----------

def tiny_quality(sizes: list[int]) -> dict:
    """A model card's quality block in the shape models_store manifests carry, made up for the tiny sizes."""
    return {str(n): {"perplexity": {"shakespeare_tempest": 90.0 - 5 * n}, "decode_tokens_per_s_cpu": 400.0 - 20 * n,
                     "chat": {"answer_perplexity": 12.0 - n, "degenerate_rate": 0.5 - 0.05 * n,
                              "degenerate_prompts": [1, 2]}}
            for n in sizes}


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("Chromium is not installed (make system-deps installs Debian's; apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable)
        except sync_api.Error as error:
            pytest.skip(f"Chromium ({executable}) does not start here: {error}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(llama_pair, chromium):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        api_keys=[KEY])
    with LiveServer(create_app(settings)) as live:
        family = live.app.state.engine.family
        family.quality = tiny_quality(family.sizes)
        live.sizes = list(family.sizes)
        entries = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        live.auto = any("speed" in entry for entry in entries)  # a server that learns speeds also chooses: auto
        yield live


class Tab:
    """A page in its own browser context, recording console errors and every request it makes."""

    def __init__(self, browser, server, key: str | None = KEY, **context):
        self.context = browser.new_context(**context)
        if key is not None:  # as the key field leaves it: in this tab's session storage
            self.context.add_init_script(f"sessionStorage.setItem('boomerang.apiKey', {key!r})")
        self.errors, self.requests = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(server.url + "/")
        self.origin = urlsplit(server.url).netloc

    def _route(self, route):
        self.requests.append(route.request.url)
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    def offsite(self) -> list[str]:
        return [url for url in self.requests if urlsplit(url).netloc != self.origin]

    def settings(self, max_tokens: int, temperature: str = "0", seed: int | None = None):
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#seed", "" if seed is None else str(seed))
        self.page.eval_on_selector("#temperature", "(e, t) => { e.value = t; e.dispatchEvent(new Event('input')); }",
                                   temperature)

    def close(self):
        self.context.close()


@pytest.fixture
def tab(chromium, server):
    opened = []

    def open_tab(**kwargs) -> Tab:
        opened.append(Tab(chromium, server, **kwargs))
        return opened[-1]

    yield open_tab
    for t in opened:
        t.close()


def api_answer(server, size: int, prompt: str, max_tokens: int, **sampling) -> tuple[str, int]:
    """What the API streams for the request the page makes: the text, and how many events carried some of it."""
    body = {"model": f"tiny-{size}L", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **sampling}
    pieces = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces += [c["delta"].get("content") for c in json.loads(line[6:])["choices"]]
    return "".join(p for p in pieces if p), sum(1 for p in pieces if p)


def test_the_page_loads_clean_lists_the_sizes_and_labels_every_control(tab, server, tmp_path):
    t = tab()
    page = t.page
    page.wait_for_selector("#size:enabled")
    labels = page.eval_on_selector_all("#size-ticks option", "os => os.map(o => o.label)")
    assert labels == [str(n) for n in server.sizes] + (["auto"] if server.auto else [])
    assert page.get_attribute("#size", "max") == str(len(labels) - 1)
    assert page.text_content("#size-value").startswith(f"tiny-{server.sizes[-1]}L · {server.sizes[-1]} layers")
    assert not page.is_visible("#auto-budget") and not page.is_visible("#status")
    page.focus("#size")
    page.keyboard.press("ArrowLeft")  # the slider answers the keyboard
    assert page.text_content("#size-value").startswith(f"tiny-{server.sizes[-2]}L")
    page.keyboard.press("Home")
    assert page.get_attribute("#size", "aria-valuetext").startswith(f"tiny-{server.sizes[0]}L")
    unlabelled = page.eval_on_selector_all(
        "input, select, textarea, button",
        "es => es.filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
        " && !(e.tagName === 'BUTTON' && e.textContent.trim())).map(e => e.id || e.outerHTML)")
    assert unlabelled == []
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")  # tabs move with the arrow keys
    assert page.is_visible("#view-compare") and not page.is_visible("#view-chat")
    page.keyboard.press("ArrowLeft")
    page.screenshot(path=str(tmp_path / "chat-empty.png"), full_page=True)
    assert t.errors == [] and t.offsite() == []
    assert t.requests and all(urlsplit(u).hostname == "127.0.0.1" for u in t.requests)


def test_a_chat_answer_streams_in_and_names_its_size(tab, server, tmp_path):
    t = tab()
    page, size, prompt = t.page, server.sizes[0], "To be, or not to be"
    page.wait_for_selector("#size:enabled")
    t.settings(max_tokens=12, temperature="1", seed=7)
    page.focus("#size")
    page.keyboard.press("Home")
    page.fill("#chat-input", prompt)
    page.press("#chat-input", "Enter")
    answer = page.wait_for_selector(".msg.assistant[data-done='true']")
    assert answer.get_attribute("data-size") == str(size)
    text, pieces = api_answer(server, size, prompt, 12, temperature=1, seed=7)
    assert pieces >= 2, "this seed no longer streams several pieces of text on the tiny pair: pick another"
    assert answer.query_selector(".text").text_content() == text
    assert int(answer.get_attribute("data-deltas")) == pieces  # shown piece by piece, as they came
    stats = answer.query_selector(".stats").text_content()
    assert re.search(rf"tiny-{size}L · {size} layers · first token \d+ ms · [\d.,]+ tokens/s · \d+ tokens", stats)
    assert answer.query_selector(".error") is None
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert t.errors == [] and t.offsite() == []


def test_auto_lets_the_server_choose_and_names_the_size_it_chose(tab, server):
    if not server.auto:
        pytest.skip("this server does not choose sizes itself (no elastic sizes): the slider has no auto")
    t = tab()
    page = t.page
    page.wait_for_selector("#size:enabled")
    t.settings(max_tokens=6)
    page.focus("#size")
    page.keyboard.press("End")
    assert page.is_visible("#auto-budget") and page.text_content("#size-value").startswith("auto")
    page.fill("#chat-input", "hi")
    page.press("#chat-input", "Enter")
    answer = page.wait_for_selector(".msg.assistant[data-done='true']")
    assert answer.query_selector(".error") is None
    chosen = re.fullmatch(r"auto → tiny-(\d+)L", answer.query_selector(".who").text_content())
    assert chosen and int(chosen.group(1)) in server.sizes
    assert answer.query_selector(".stats").text_content().startswith(f"tiny-{chosen.group(1)}L")
    assert t.errors == [] and t.offsite() == []


def test_compare_streams_one_column_per_chosen_size(tab, server, tmp_path):
    t = tab()
    page, prompt, sizes = t.page, "Hello world", server.sizes
    page.wait_for_selector("#size:enabled")
    page.click("#tab-compare")
    t.settings(max_tokens=10)
    chosen = [sizes[0], sizes[(len(sizes) - 1) // 2], sizes[-1]]  # smallest, middle and largest by default
    assert page.eval_on_selector_all("#compare-choices input:checked", "es => es.map(e => e.value)") == [
        f"tiny-{n}L" for n in chosen]
    page.fill("#compare-input", prompt)
    page.click("#compare-send")
    page.wait_for_selector("#compare-columns .column[data-done] >> nth=2")  # (wait_for_function: CSP forbids eval)
    columns = page.query_selector_all("#compare-columns .column")
    assert [c.get_attribute("data-size") for c in columns] == [str(n) for n in chosen]
    for column, n in zip(columns, chosen):
        assert column.query_selector("h3").text_content() == f"tiny-{n}L · {n} layers"
        assert column.query_selector(".error") is None
        assert column.query_selector(".text").text_content() == api_answer(server, n, prompt, 10)[0]
        stats = column.query_selector(".stats").text_content()  # (— tokens/s: all its tokens arrived at once)
        assert re.search(rf"^tiny-{n}L · {n} layers · first token \d+ ms · (?:[\d.,]+|—) tokens/s · \d+ tokens", stats)
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

    page.uncheck(f"#cmp-{chosen[1]}")
    page.uncheck(f"#cmp-{chosen[2]}")  # one size is not a comparison
    assert page.is_disabled("#compare-send") and "two to four" in page.text_content("#compare-hint")
    assert t.errors == [] and t.offsite() == []


class CardEngine(FakeEngine):
    """The fake family (2, 3 and 4 layers) with a model card, its tokens 20 ms apart."""

    def __init__(self):
        super().__init__(token_delay_s=0.02)

    def models(self):
        quality = tiny_quality([2, 3, 4])
        return [replace(card, quality=quality[str(card.num_layers)]) for card in super().models()]


def test_the_family_view_draws_quality_and_the_speed_measured_here(chromium, tmp_path):
    with LiveServer(create_app(Settings(), engine_factory=lambda s, m: CardEngine())) as live:
        t = Tab(chromium, live, key=None)
        try:
            family_view(t, tmp_path)
        finally:
            t.close()


def family_view(t: Tab, tmp_path: Path):
    page, sizes = t.page, [2, 3, 4]
    page.wait_for_selector("#size:enabled")
    page.click("#tab-family")
    assert page.query_selector_all("#speed-chart circle.s1") == []  # nothing measured in this session yet
    page.click("#tab-compare")
    page.uncheck("#cmp-3")
    t.settings(max_tokens=6)
    page.fill("#compare-input", "The quick brown fox")
    page.click("#compare-send")
    page.wait_for_selector("#compare-columns .column[data-done] >> nth=1")
    page.click("#tab-family")
    metrics = page.eval_on_selector_all("#quality-metric option", "os => os.map(o => o.value)")
    assert metrics == ["perplexity · shakespeare_tempest", "chat · answer_perplexity", "chat · degenerate_rate"]
    assert page.input_value("#quality-metric") == "chat · answer_perplexity"
    assert len(page.query_selector_all("#quality-chart circle")) == len(sizes)
    assert "lower is better" in page.text_content("#quality-caption")
    legend = page.text_content("#speed-chart .legend")
    assert "model card: decode_tokens_per_s_cpu" in legend and "this session" in legend
    card = page.query_selector_all("#speed-chart circle.s2")
    session = page.query_selector_all("#speed-chart circle.s1")
    assert len(card) == len(sizes) and len(session) == 2  # measured only for the sizes answered here
    assert "measured in this page from the streamed answers" in page.text_content("#speed-caption")
    rows = page.eval_on_selector_all("#family-table tbody tr", "rs => rs.map(r => r.lastElementChild.textContent)")
    assert rows[1] == "—"
    # tokens 20 ms apart: about 50 tokens/s, less on a busy machine; a busy browser may read two tokens in one
    # chunk, which shortens the measured span (not by more than a few intervals of six tokens)
    for cell in (rows[0], rows[2]):
        rate, answers = re.fullmatch(r"([\d.]+) \((\d+)\)", cell).groups()
        assert 5 < float(rate) <= 150 and answers == "1", rows
    page.select_option("#quality-metric", "chat · degenerate_rate")
    assert "lower is better" in page.text_content("#quality-caption")
    page.screenshot(path=str(tmp_path / "family.png"), full_page=True)
    assert t.errors == [] and t.offsite() == []


def test_a_wrong_key_shows_the_401_and_the_right_one_recovers(tab, server, tmp_path):
    t = tab(key="wrong-key")
    page = t.page
    alert = page.wait_for_selector("#status:not([hidden])")
    assert re.search(r"401 authentication_error: missing or invalid API key.*API key", alert.text_content())
    assert page.is_disabled("#size")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # a change reloads the family with the new key
    page.wait_for_selector("#size:enabled")
    assert page.is_hidden("#status")
    assert page.evaluate("sessionStorage.getItem('boomerang.apiKey')") == KEY
    page.fill("#api-key", "wrong-again")
    page.press("#api-key", "Tab")
    page.wait_for_selector("#status:not([hidden])")
    t.settings(max_tokens=4)
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    answer = page.wait_for_selector(".msg.assistant[data-done='true']")
    assert "401" in answer.query_selector(".error").text_content()
    page.screenshot(path=str(tmp_path / "wrong-key.png"), full_page=True)
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#status[hidden]", state="attached")
    t.settings(max_tokens=100_000)  # more than the context holds
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done='true'] >> nth=1")
    assert "context_length_exceeded" in page.text_content("#status")
    assert t.offsite() == []


def test_a_busy_server_shows_the_429_with_its_retry_time(chromium, tmp_path):
    app = create_app(Settings(), engine_factory=lambda s, m: FakeEngine(capacity=0))
    with LiveServer(app) as live:
        t = Tab(chromium, live, key=None)
        try:
            t.page.wait_for_selector("#size:enabled")
            t.settings(max_tokens=4)
            t.page.fill("#chat-input", "hi")
            t.page.click("#chat-send")
            t.page.wait_for_selector(".msg.assistant[data-done='true']")
            assert re.search(r"429 rate_limit_error: .* retry in 2 s", t.page.text_content("#status"))
        finally:
            t.close()


def test_the_page_fits_a_phone_width_screen(tab, server, tmp_path):
    t = tab(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = t.page
    page.wait_for_selector("#size:enabled")
    for view in ("chat", "compare", "family"):
        page.click(f"#tab-{view}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (view, overflow)
        page.screenshot(path=str(tmp_path / f"phone-{view}.png"), full_page=True)
    assert t.errors == [] and t.offsite() == []


def test_asset_routes_take_no_query_parameter(tmp_path):
    from app.main import create_app
    from app.settings import Settings
    from tests.app.fake_engine import FakeEngine
    from tests.conftest import LiveServer

    with LiveServer(create_app(Settings(), engine_factory=lambda s, m: FakeEngine())) as live:
        css = httpx.get(live.url + "/playground/app.css?asset=index.html")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
