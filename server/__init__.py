"""HTTP retrieval service (FastAPI)."""
