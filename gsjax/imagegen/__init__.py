"""Image generation behind one HTTP schema (agent.md §6).

Server side: `server` (FastAPI app), `worker` (device pool + FIFO queue), `pipelines` (diffusers loading
and calls), `references` (request images), `bodylimit` (413), `tiny` (tiny random pipelines), `cli`
(`gsjax serve-image`). Client side: `client` (image-server client, backend config), `openai_images`
(OpenAI-compatible images API), `transport` (retries and errors), `dataurl`. `schema` is shared.

Nothing is imported here, so the client never pulls in torch or FastAPI.
"""
