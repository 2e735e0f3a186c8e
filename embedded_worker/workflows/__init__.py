"""Workflow definitions: declarative files validated by pydantic, built-in and user-supplied."""
