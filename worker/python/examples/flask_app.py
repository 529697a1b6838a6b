"""A stock Flask app, unchanged for fdbroker:

    fdbroker --workers=4 \\
        --worker_cmd="python3 -m fdbroker_worker.run --app-dir=examples flask_app:app"

The runner serves it as WSGI on uvicorn's HTTP protocol, with the app's
requests on a bounded thread pool (--threads N, default 10: at most N
requests in the app at once per worker). Also runs as is under
`flask --app flask_app run` or `gunicorn -w 4 flask_app:app`.
"""

import hashlib
import os
import time

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def root():
    return jsonify(hello="world", pid=os.getpid())


@app.get("/sleep")
def sleep():
    """Answers after `ms` milliseconds (0-60000), holding a pool thread."""
    ms = min(max(request.args.get("ms", 0, type=int), 0), 60000)
    time.sleep(ms / 1000)
    return jsonify(pid=os.getpid(), slept_ms=ms)


@app.post("/echo")
def echo():
    """Answers with the request's body."""
    return app.response_class(request.get_data(),
                              content_type=request.content_type)


@app.get("/cpu")
def cpu():
    """Burns about `ms` milliseconds of CPU."""
    ms = request.args.get("ms", 20, type=int)
    deadline = time.process_time() + ms / 1000
    digest = b""
    while time.process_time() < deadline:
        digest = hashlib.sha256(digest).digest()
    return jsonify(pid=os.getpid(), ms=ms)
