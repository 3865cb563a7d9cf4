"""HTTP layer: the FastAPI app factory, routers, schemas and problem+json error handling."""
