"""`fastner serve`: an HTTP service (FastAPI + uvicorn) with dynamic batching, and its load test.

Needs the `serve` extra: pip install 'fastner[serve]'."""
