"""The servers `serve-app bench` measures serve_app against, each a script it starts by path.

They ship with the package because they are part of what the bench measures. Flask and
uvicorn are test dependencies (`pip install 'serve_app[test]'`); the bench says so at start
when one is missing.
"""
