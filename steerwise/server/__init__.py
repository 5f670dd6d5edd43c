"""``steerwise serve``: an OpenAI-compatible server with per-request recipe and strength.

Importing this package needs nothing beyond steerwise; the HTTP side (``steerwise.server.app``)
needs the ``serve`` extra (fastapi, uvicorn). See docs/serving.md.
"""
