"""The default application as an object, for tools that want one rather than a builder:

    serve build serve_app.default_app:app -o config.yaml

It is built from the defaults (model iris, store $SERVE_APP_STORE or ./models) when this
module is imported, so that store must hold the model. Configs use `serve_app.app:build_app`.
"""

from serve_app.app import build_app

app = build_app()
