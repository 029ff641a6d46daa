"""The web dashboard and HTTP API (`[web]`): the page, `/api/v1`, and their OpenAPI document.

`server` binds and accepts (portfwd's own accept loop, as for /metrics), `app` routes requests
through `guard` (token, Origin, Host), `feed` turns the state into the live stream and the rate
history, `openapi` describes it all from the same status types the CLI reads. The page itself
is three static files in `assets/`.
"""
