"""HTTP API: one module per resource, plus the endpoint machinery."""
