"""The HTTP API: OpenAI-compatible protocol models, errors, routes, and what serves them.

Lives here: request/response models, error bodies, presets and steering resolution, request
preparation, the per-choice tracker, job submission, JSON and streamed responses, and the chat /
completions / compare endpoints. May import: `steering`, `server.security`, `server.observability`,
`server.context`, and the engine only through `server.engine`'s public names.
"""
