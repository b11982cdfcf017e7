"""The HTTP API: OpenAI-compatible protocol models, errors, routes, and what serves them.

Lives here: request/response models, error bodies, presets and steering resolution, the chat /
completions / compare endpoints and their streaming. May import: `steering`, `server.security`,
`server.observability`, and the engine only through `server.engine`'s public names.
"""
