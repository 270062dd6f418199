"""Plumbing: the SQL engine, the Redis client and its auto-pipeline, Lua loading, the embedded
Valkey, supervised child processes and background loops. Nothing here knows rooms or sales."""
