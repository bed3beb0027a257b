"""Serving on Ray Serve: an OpenAI-compatible completions API, batching, a web page, live checkpoint moves.

    raygpt serve runs/demo                        # a local cluster, http://127.0.0.1:8000
    serve run raygpt.serve:app checkpoint=runs/demo max_batch_size=32
    serve deploy serve.yaml                       # applications: [{import_path: raygpt.serve:app, args: ...}]

``app`` is the application builder those take; raygpt/serve/app.py has the deployment, api.py the
request rules. Ray, FastAPI and torch are imported only when the application is built.
"""


def app(args: dict):
    """Ray Serve application builder: see raygpt.serve.app.build for the arguments."""
    from raygpt.serve.app import build

    return build(args)
