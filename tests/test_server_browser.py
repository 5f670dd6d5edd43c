"""The playground page at `/`, driven in a real headless Chromium (Debian's) through Playwright.

Skips with the reason when Playwright or a chromium binary is missing (`.ci/browser-deps.sh`
installs Debian's chromium; never `playwright install`).
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (serve extra) missing")

from conftest import random_recipe

from steerwise.models import load_model
from steerwise.server.app import ServerThread, create_app
from steerwise.server.engine import Engine
from steerwise.server.schemas import ServerConfig

CHROMIUM = os.environ.get("STEERWISE_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium, or .ci/browser-deps.sh)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "concept-lm"


@pytest.fixture(scope="module")
def servers():
    model, tok = load_model(MODEL, device="cpu")
    recipes = {"gated": random_recipe(model, gated=True, seed=4, scale=0.8),
               "plain": random_recipe(model, gated=False, seed=6, scale=0.5)}
    engine = Engine(model, tok, recipes, max_batch=4)
    config = ServerConfig(model_name=MODEL, default_recipe="gated", default_strength=3.0)
    with ServerThread(create_app(engine, config)) as open_srv, \
            ServerThread(create_app(engine, ServerConfig(model_name=MODEL,
                                                         api_key="k3y"))) as keyed:
        yield open_srv.url, keyed.url
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=FLAGS)
        yield context
        context.close()


def _set_strength(page, value: str) -> None:
    page.eval_on_selector(
        "#strength", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value)


def test_playground_shows_steered_unsteered_and_the_gate_heat_map(servers, browser):
    url, _ = servers
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    options = page.eval_on_selector_all("#recipe option", "os => os.map(o => o.value)")
    assert options == ["gated", "plain"]
    assert page.input_value("#recipe") == "gated"  # the server's default
    assert page.input_value("#strength") == "3"

    prompt = "the farmer picked a ripe"
    page.fill("#prompt", prompt)
    _set_strength(page, "6")
    assert page.inner_text("#strength-value") == "6"
    page.fill("#max-tokens", "12")
    page.click("#run")
    page.wait_for_selector("body[data-done='1']", timeout=30_000)
    assert "error" not in (page.get_attribute("#status", "class") or ""), page.inner_text("#status")

    # the page shows exactly what the API returns for the same requests
    base = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    steered = httpx.post(url + "/v1/completions", json={
        **base, "steering": {"recipe": "gated", "strength": 6, "explain": True}}).json()
    unsteered = httpx.post(url + "/v1/completions", json={
        **base, "steering": {"recipe": None}}).json()
    assert page.text_content("#steered") == steered["choices"][0]["text"]
    assert page.text_content("#unsteered") == unsteered["choices"][0]["text"]
    assert steered["choices"][0]["text"] != unsteered["choices"][0]["text"]

    ex = steered["steering"]["explain"]
    headers = page.eval_on_selector_all("#heatmap th.tok", "hs => hs.map(h => h.textContent)")
    assert headers == ex["tokens"]
    assert page.eval_on_selector_all("#heatmap th.gen", "hs => hs.length") == \
        len(ex["tokens"]) - ex["n_prompt"]
    sites = page.eval_on_selector_all("#heatmap td.site", "ts => ts.map(t => t.textContent)")
    assert sites == ex["sites"]
    shown = page.eval_on_selector_all("#heatmap td.gate", "ts => ts.map(t => Number(t.dataset.value))")
    want = [ex["gates"][k][j] for j in range(len(ex["sites"])) for k in range(len(ex["tokens"]))
            if ex["gates"][k] is not None]
    assert shown == pytest.approx(want, abs=1e-5)  # batched with the unsteered row: float noise
    assert len(set(shown)) > 1  # a gated recipe: the heat map varies token to token
    assert not errors


def test_playground_switches_recipe_and_needs_the_key_when_the_server_has_one(servers, browser):
    _, keyed = servers
    page = browser.new_page()
    page.goto(keyed + "/")
    page.wait_for_selector("#status.error", timeout=15_000)
    assert "API key" in page.inner_text("#status")
    page.fill("#api-key", "k3y")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    page.select_option("#recipe", "plain")
    assert page.input_value("#strength") == "1"  # the recipe's own default strength
    page.fill("#max-tokens", "6")
    page.click("#run")
    page.wait_for_selector("body[data-done='1']", timeout=30_000)
    assert page.text_content("#steered")
    # an ungated recipe: every traced cell is its layer scale
    shown = page.eval_on_selector_all("#heatmap td.gate", "ts => ts.map(t => Number(t.dataset.value))")
    assert shown and set(shown) == {0.5}
