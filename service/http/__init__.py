"""The HTTP face: aiohttp routes, JobSpec checks, OpenAPI, the runner."""
