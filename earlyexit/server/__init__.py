"""A completion server editors and tools can talk to: OpenAI's completions API, streaming, batched across clients.

`engine` (the worker thread: rows join and leave the running batch), `protocol` (the request and answer objects),
`app` (the FastAPI routes). Started by `python -m earlyexit.serve`; needs the `serve` extra (FastAPI, uvicorn).
"""
