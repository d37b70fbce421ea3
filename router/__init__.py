"""Baton's router: the OpenAI-compatible HTTP API and the public gRPC API in
front of the prefill/decode pools.

Module map (each has one job):
  config.py        RouterConfig (frozen dataclass)
  errors.py        the errors a request can end with, and their HTTP/gRPC mapping
  schemas.py       OpenAI request/response models (pydantic)
  tokenizer.py     prompt/chat → token ids, and the incremental detokenizer
  detokenize.py    a sample's token stream → text deltas, stop strings
  policy.py        pure routing decisions (prefill worker, decode worker, local vs remote)
  prefix_index.py  "how many leading blocks does each worker hold?" (Redis or in-process)
  directory.py     the worker set (static list or Redis registry) and their load
  orchestrator.py  one sample's life on the cluster: route, prefill, decode, abort
  admission.py     the router queue (bounded, 429 when full)
  service.py       a whole request: validate, tokenize, fan out n samples, usage
  metrics.py       Prometheus metrics (``baton:`` prefix)
  app.py           FastAPI app (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
  grpc_server.py   gRPC Serving service + grpc.health.v1
  server.py        build_router(config) and serve()
"""
