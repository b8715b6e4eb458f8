"""Serving: an OpenAI-compatible endpoint for the base model and its domain adapters.

- `registry`: which adapters exist (run directories and promoted versions), name
  validation, and eval-gated promotion (`selfspec promote`).
- `protocol`: the OpenAI request schemas, limits and response bodies, as plain Python.
- `app`: the Ray Serve application (FastAPI ingress + multiplexed model replicas).
"""
