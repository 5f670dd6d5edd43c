"""`steerwise serve`: OpenAI shapes through the real `openai` client, batching exactness, bounds.

One server per module (uvicorn in a thread on a free loopback port) with concept-lm and three
recipes of different shapes: the demo's CAA + DSAS 'pear' (fitted), an affine LinEAS-shaped map
without a gate, and a random CAA without a gate.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import make_model, make_tokenizer, random_recipe

from steerwise.generate import generate
from steerwise.hooks import SiteSteering
from steerwise.maps.lineas import LinEASMap
from steerwise.models import load_model
from steerwise.recipe import ModelIdentity, Recipe
from steerwise.server.app import ServerThread, create_app, exposure_warning
from steerwise.server.cli import demo_recipe
from steerwise.server.engine import Engine, wait_idle
from steerwise.server.schemas import ServerConfig
from steerwise.sites import resolve_sites, site_width

MODEL = "concept-lm"
PROMPTS = ["the farmer picked a ripe", "we took the broken", "the boy tamed the",
           "my uncle washed a", "the hiker watched the chilly", "there was a small"]


def affine_recipe(model, seed: int = 3) -> Recipe:
    """A LinEAS-shaped affine map (ω ⊙ x + β) on every residual site, no gate."""
    g = torch.Generator().manual_seed(seed)
    entries = []
    for s in resolve_sites(model, "residual"):
        d = site_width(model, s)
        omega = 1.0 + 0.05 * torch.randn(d, generator=g)
        entries.append(SiteSteering(s, LinEASMap(omega, 0.3 * torch.randn(d, generator=g))))
    return Recipe(ModelIdentity.of(model), entries, "lineas", "none", 1.0)


@pytest.fixture(scope="module")
def served():
    model, tok = load_model(MODEL, device="cpu")
    recipes = {"pear": demo_recipe(model, tok, n_fit=16), "affine": affine_recipe(model),
               "rand": random_recipe(model, gated=False, seed=5, scale=0.5)}
    engine = Engine(model, tok, recipes, max_batch=4, max_queue=16)
    config = ServerConfig(model_name=MODEL, max_tokens=64, max_prompt_tokens=48,
                          max_body_bytes=20_000, max_queue=16, max_batch=4)
    server = ServerThread(create_app(engine, config)).start()
    keyed = ServerThread(create_app(engine, ServerConfig(
        model_name=MODEL, api_key="s3cret", max_queue=8, max_batch=4))).start()
    yield {"url": server.url, "keyed": keyed.url, "engine": engine, "model": model, "tok": tok,
           "recipes": recipes}
    server.stop()
    keyed.stop()
    engine.close()


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)


def complete(client, prompt, recipe=None, strength=0.0, max_tokens=12, **kw):
    steering = {"recipe": recipe, "strength": strength}
    steering.update(kw.pop("steering", {}))
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                      temperature=kw.pop("temperature", 0.0),
                                      extra_body={"steering": steering}, **kw)


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---- shapes ------------------------------------------------------------------------------------
def test_models_lists_the_model_and_its_recipes(served, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    steering = models[0].model_extra["steering"]
    assert {r["name"] for r in steering["recipes"]} == {"pear", "affine", "rand"}
    pear = next(r for r in steering["recipes"] if r["name"] == "pear")
    assert (pear["method"], pear["gate"]) == ("caa", "dsas")
    health = httpx.get(served["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


@pytest.mark.parametrize("recipe,strength", [(None, 0.0), ("pear", 5.0), ("affine", 3.0)])
def test_completion_equals_steerwise_generate(served, client, recipe, strength):
    """The server's decode loop gives the tokens of HF generate with the same recipe."""
    prompt = PROMPTS[0]
    got = complete(client, prompt, recipe, strength)
    rec = served["recipes"][recipe] if recipe else None
    with served["engine"].tok_lock:  # the model is shared: run generate while the server idles
        assert wait_idle(served["engine"])
        want = generate(served["model"], served["tok"], [prompt], rec, strength,
                        max_new_tokens=12).continuations[0]
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(served["tok"](prompt)["input_ids"])
    assert got.model_extra["steering"]["recipe"] == recipe


def test_steering_changes_the_text_and_strength_zero_does_not(client):
    base = complete(client, PROMPTS[1]).choices[0].text
    assert complete(client, PROMPTS[1], "pear", 0.0).choices[0].text == base
    assert complete(client, PROMPTS[0], "pear", 8.0).choices[0].text != \
        complete(client, PROMPTS[0]).choices[0].text


def test_stream_equals_non_stream(client):
    full = complete(client, PROMPTS[2], "rand", 2.0, max_tokens=16)
    chunks = list(complete(client, PROMPTS[2], "rand", 2.0, max_tokens=16, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len([c for c in chunks if c.choices[0].text]) > 1  # token by token, not one blob


def test_stop_strings_cut_the_text(client):
    full = complete(client, PROMPTS[3], max_tokens=20).choices[0].text
    words = full.split()
    assert len(words) > 3
    stop = " " + words[2]
    cut = complete(client, PROMPTS[3], max_tokens=20, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = complete(client, PROMPTS[3], max_tokens=20, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_explain_returns_per_token_gates(served, client):
    prompt = PROMPTS[0]
    r = complete(client, prompt, "pear", 5.0, max_tokens=8, steering={"explain": True})
    ex = r.model_extra["steering"]["explain"]
    recipe = served["recipes"]["pear"]
    assert ex["sites"] == [e.site.name for e in recipe.entries]
    n_prompt = len(served["tok"](prompt)["input_ids"])
    assert ex["n_prompt"] == n_prompt
    assert "".join(ex["tokens"][n_prompt:]).strip() == r.choices[0].text.strip()
    assert ex["gates"][-1] is None  # the last token never went through the model
    values = torch.tensor(ex["gates"][:-1])
    assert values.shape == (len(ex["tokens"]) - 1, len(ex["sites"]))
    assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    with served["engine"].tok_lock:  # the same values as the library's traced generate
        assert wait_idle(served["engine"])
        ref = generate(served["model"], served["tok"], [prompt], recipe, 5.0, max_new_tokens=8,
                       explain=True).trace
    torch.testing.assert_close(values, torch.tensor(ref.values[0][: len(values)]).float(),
                               rtol=1e-4, atol=1e-5)
    stream = list(complete(client, prompt, "pear", 5.0, max_tokens=8, stream=True,
                           steering={"explain": True}))
    assert stream[-1].choices[0].finish_reason and stream[-1].model_extra["steering"]["explain"]
    assert stream[-1].model_extra["steering"]["explain"]["tokens"] == ex["tokens"]
    # an ungated recipe: every token gets its layer scale
    ex = complete(client, prompt, "rand", 1.0, max_tokens=4,
                  steering={"explain": True}).model_extra["steering"]["explain"]
    assert {v for row in ex["gates"][:-1] for v in row} == {0.5}


def test_default_recipe_and_strength(served):
    engine = served["engine"]
    config = ServerConfig(model_name=MODEL, default_recipe="pear", default_strength=6.0)
    with ServerThread(create_app(engine, config)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert r.model_extra["steering"] == {"recipe": "pear", "strength": 6.0, "explain": None}
        explicit = complete(c, PROMPTS[0], "pear", 6.0, max_tokens=10)
        assert r.choices[0].text == explicit.choices[0].text
        off = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                   extra_body={"steering": {"recipe": None}})
        assert off.model_extra["steering"]["recipe"] is None
    with pytest.raises(ValueError, match="not loaded"):
        create_app(engine, ServerConfig(default_recipe="nope"))


# ---- batching: a row's output does not depend on the batch -------------------------------------
MIX = [(p, rec, s) for p, (rec, s) in zip(
    PROMPTS * 2,
    [("pear", 5.0), ("affine", 3.0), (None, 0.0), ("rand", 2.0), ("pear", 0.0), ("affine", -2.0),
     ("rand", 4.0), ("pear", 8.0), (None, 0.0), ("affine", 1.0), ("pear", 3.0), ("rand", 1.0)])]


def _text(client, prompt, recipe, strength, **kw):
    return complete(client, prompt, recipe, strength, max_tokens=10, **kw).choices[0].text


def test_mixed_batch_equals_each_request_alone(served, client):
    engine = served["engine"]
    alone = [_text(client, *m) for m in MIX]  # one at a time
    sampled = [_text(client, p, "pear", 4.0, temperature=0.9, seed=i) for i, p in
               enumerate(PROMPTS[:3])]
    engine.stats["max_rows"] = 0
    jobs = [(m, {}) for m in MIX] + [((p, "pear", 4.0), {"temperature": 0.9, "seed": i})
                                     for i, p in enumerate(PROMPTS[:3])]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return _text(client, *job[0], **job[1])

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert engine.stats["max_rows"] >= 3, "the requests were not batched"
    assert together[: len(MIX)] == alone
    assert together[len(MIX):] == sampled  # seeded sampling is per row too
    assert len(set(alone)) > len(MIX) // 2  # the mix really differs row to row


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc")
def test_load_every_request_answered_exactly_and_memory_flat(served, client):
    """M clients × K requests with mixed recipes and strengths, loopback, bounded in time."""
    clients, per_client, rounds = 4, 6, 3
    reference = {m: _text(client, *m) for m in MIX}

    def worker(k):
        return [(m, _text(client, *m)) for m in
                (MIX[(k * per_client + j) % len(MIX)] for j in range(per_client))]

    rss = []
    start = time.monotonic()
    for _ in range(rounds):
        with ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(worker, range(clients)) for r in rs]
        assert len(results) == clients * per_client  # none lost
        assert all(text == reference[m] for m, text in results)
        assert wait_idle(served["engine"])
        rss.append(_rss_mib())
    assert time.monotonic() - start < 120
    print(f"RSS after each round (MiB): {[round(x, 1) for x in rss]}")
    # after the first round (allocator warm), further rounds do not grow the process
    assert rss[-1] - rss[0] < 25, f"RSS grew {rss} MiB"
    assert served["engine"].load() == {"running": 0, "waiting": 0}


# ---- bounds and bad input: 4xx in OpenAI's shape -------------------------------------------------
@pytest.mark.parametrize("body,status,param,needle", [
    ({"steering": {"recipe": "detox"}}, 400, "steering.recipe", "'pear'"),
    ({"steering": {"recipe": "/tmp/recipes/pear"}}, 400, "steering.recipe", "unknown recipe"),
    ({"steering": {"recipe": "pear", "strength": 1e6}}, 400, "steering.strength", "±"),
    ({"steering": {"recipe": "pear", "path": "/etc"}}, 400, "steering.path", "xtra"),
    ({"steering": {"explain": True, "recipe": None}}, 400, "steering.explain", "needs a recipe"),
    ({"max_tokens": 0}, 400, "max_tokens", "between 1 and 64"),
    ({"max_tokens": 65}, 400, "max_tokens", "between 1 and 64"),
    ({"prompt": "the " * 60}, 400, "prompt", "at most 48"),
    ({"prompt": []}, 400, "prompt", "one prompt per request"),
    ({"prompt": [5, 10**6]}, 400, "prompt", "token ids"),
    ({"prompt": [[1, 2], [3]]}, 400, "prompt", None),
    ({"n": 2}, 400, "n", "n must be 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"temperature": 5}, 400, "temperature", None),
    ({"model": "gpt-4"}, 404, "model", "concept-lm"),
])
def test_bad_requests_get_openai_errors(served, body, status, param, needle):
    payload = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, **body}
    err = assert_openai_error(httpx.post(served["url"] + "/v1/completions", json=payload), status)
    assert err["param"] == param
    if needle:
        assert needle in err["message"]


def test_non_finite_strength_and_broken_json(served):
    url = served["url"] + "/v1/completions"
    for raw in (b'{"model": "concept-lm", "prompt": "a", "steering": {"strength": NaN}}',
                b'{"model": "concept-lm", "prompt": "a", "steering": {"strength": Infinity}}'):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert "finite" in assert_openai_error(r, 400)["message"]
    r = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]
    r = httpx.post(url, content=b'{"model": "concept-lm", "prompt": "a"}')  # no content type
    assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]
    r = httpx.post(url, json=[1, 2])
    assert "JSON object" in assert_openai_error(r, 400)["message"]


def test_prompt_plus_max_tokens_beyond_context(served):
    engine = served["engine"]
    config = ServerConfig(model_name=MODEL, max_tokens=engine.context)
    with ServerThread(create_app(engine, config)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": engine.context})
        assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"


def test_body_size_is_bounded(served):
    url = served["url"] + "/v1/completions"
    big = {"model": MODEL, "prompt": "the " * 6000, "max_tokens": 4}
    assert assert_openai_error(httpx.post(url, json=big), 413)["code"] == "body_too_large"

    def chunks():  # no content-length: counted while reading
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)


def test_chat_without_template_is_a_clear_400(served, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in str(info.value)


def test_unknown_route_and_method(served):
    assert_openai_error(httpx.get(served["url"] + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(served["url"] + "/v1/completions"), 405)


@pytest.fixture()
def slow_model(served, monkeypatch):
    """Each forward call takes ≥ 40 ms, so requests overlap long enough to observe."""
    engine = served["engine"]
    fast = engine._forward

    def slow(*args, **kwargs):
        time.sleep(0.04)
        return fast(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)
    yield engine
    monkeypatch.setattr(engine, "_forward", fast)
    assert wait_idle(engine, 30)


def test_full_queue_answers_429(served, slow_model):
    n = slow_model.max_batch + slow_model.max_queue + 6

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[
                c.post(served["url"] + "/v1/completions",
                       json={"model": MODEL, "prompt": PROMPTS[i % 6], "max_tokens": 30})
                for i in range(n)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= slow_model.max_queue + 1  # the queue, plus at least one running
    err = assert_openai_error(next(r for r in responses if r.status_code == 429), 429)
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"


def test_disconnect_frees_the_batch_slot(served, slow_model):
    before = slow_model.stats["cancelled"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 60, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", served["url"] + "/v1/completions",
                                                   json=body) as r:
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(4)) if line.startswith("data:")]
        assert got and slow_model.load()["running"] == 1
    # 60 tokens would take ≥ 2.4 s; the row must leave well before
    end = time.monotonic() + 1.5
    while slow_model.load()["running"] and time.monotonic() < end:
        time.sleep(0.02)
    assert slow_model.load()["running"] == 0
    assert slow_model.stats["cancelled"] == before + 1
    # a non-streaming client that gives up is noticed too (raw socket: close once it runs)
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = served["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        end = time.monotonic() + 5
        while slow_model.load()["running"] == 0 and time.monotonic() < end:
            time.sleep(0.01)
        assert slow_model.load()["running"] == 1
    end = time.monotonic() + 2.0
    while slow_model.load()["running"] and time.monotonic() < end:
        time.sleep(0.02)
    assert slow_model.load()["running"] == 0
    assert slow_model.stats["cancelled"] == before + 2


# ---- safety --------------------------------------------------------------------------------------
def test_api_key(served):
    url = served["keyed"]
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer wrong"},
                   json={"model": MODEL, "prompt": "a"})
    assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert complete(c, PROMPTS[0], "pear", 5.0).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(url + "/").status_code == 200  # the page holds no secret; its calls do


def test_binds_loopback_by_default_and_warns_when_exposed():
    from steerwise.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("192.168.1.5", None)


def test_cast_recipes_are_refused_at_start(served):
    from steerwise.gates.cast import CASTGate

    model = served["model"]
    sites = resolve_sites(model, "residual")
    entries = [SiteSteering(sites[0], random_recipe(model).entries[0].map,
                            CASTGate("condition", vector=torch.ones(site_width(model, sites[0]))))]
    cast = Recipe(ModelIdentity.of(model), entries, "caa", "cast", 1.0)
    with pytest.raises(ValueError, match="'cast' gate"):
        Engine(model, served["tok"], {"c": cast})


def test_recipe_arguments():
    from steerwise.server.cli import parse_recipe_args

    assert parse_recipe_args(["detox=recipes/d", "recipes/pear"]) == {
        "detox": Path("recipes/d"), "pear": Path("recipes/pear")}
    for bad in (["=x"], ["none=x"], ["a=x", "a=y"]):
        with pytest.raises(ValueError):
            parse_recipe_args(bad)


# ---- chat: a tokenizer with a template; a model served without joining ---------------------------
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")


@pytest.fixture(scope="module")
def chat_server():
    model, tok = make_model("llama"), make_tokenizer()
    tok.chat_template = TEMPLATE
    recipe = random_recipe(model, seed=2)
    engine = Engine(model, tok, {"r": recipe}, max_batch=4, joining=False)
    with ServerThread(create_app(engine, ServerConfig(model_name="tiny"))) as srv:
        yield srv.url, engine, tok
    engine.close()


def test_chat_uses_the_template(chat_server):
    url, _engine, tok = chat_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "the apple is"}]
    kw = {"model": "tiny", "max_tokens": 6, "temperature": 0,
              "extra_body": {"steering": {"recipe": "r", "strength": 2.0}}}
    chat = c.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant"
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    plain = c.completions.create(prompt=ids, **kw)
    assert chat.choices[0].message.content == plain.choices[0].text
    stream = c.chat.completions.create(messages=messages, stream=True, **kw)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == \
        chat.choices[0].message.content
    r = httpx.post(url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert_openai_error(r, 400)


def test_batches_without_joining_equal_alone(chat_server):
    url, engine, _ = chat_server
    assert not engine.joining
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    jobs = [(p, rec, s) for p, rec, s in zip(["the apple", "a dog runs", "rain and snow", "the car"],
                                             ["r", None, "r", "r"], [1.0, 0.0, -2.0, 3.0])]
    kw = {"model": "tiny", "max_tokens": 6, "temperature": 0}

    def run(job):
        p, rec, s = job
        return c.completions.create(prompt=p, extra_body={"steering": {"recipe": rec,
                                                                       "strength": s}},
                                    **kw).choices[0].text

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == alone


def test_serve_command_loads_recipe_dirs_and_names_bad_ones(served, tmp_path):
    from steerwise.cli import build_parser, main
    from steerwise.server.cli import build_server

    served["recipes"]["affine"].save_pretrained(tmp_path / "aff")
    args = build_parser().parse_args(["serve", "--recipe", f"a={tmp_path / 'aff'}", "--device",
                                      "cpu", "--default-recipe", "a", "--served-name", "m"])
    _, engine, config = build_server(args)
    try:
        assert list(engine.recipes) == ["a"] and config.default_recipe == "a"
        assert config.model_name == "m" and config.api_key is None
    finally:
        engine.close()
    assert main(["serve", "--device", "cpu", "--recipe", f"x={tmp_path / 'missing'}"]) == 2


def test_queue_bound_counts_beyond_free_rows():
    """max_queue=0: a request still gets a free row; a third while two run is refused."""
    from steerwise.server.engine import Job, QueueFullError

    engine = Engine(make_model("llama"), make_tokenizer(), max_batch=2, max_queue=0)
    try:
        done = threading.Semaphore(0)
        events = []

        def emit(ev):
            events.append(ev)
            if ev.kind != "delta":
                done.release()

        engine.submit(Job([5, 6, 7], 4, emit))
        assert done.acquire(timeout=30) and events[-1].kind == "done"
        deadline = time.monotonic() + 30  # "done" is sent before the worker retires the row
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        with engine._cond:  # hold the worker between steps: two wait for the two free rows
            engine.submit(Job([5, 6], 2, emit))
            engine.submit(Job([7, 8], 2, emit))
            with pytest.raises(QueueFullError):
                engine.submit(Job([9], 2, emit))
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.close()
