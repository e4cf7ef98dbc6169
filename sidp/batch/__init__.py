"""Batch jobs: OpenAI Batch or plain JSONL in, results out as they finish, resumable."""
