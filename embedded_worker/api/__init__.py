"""The facade and what a call is: request shapes, call forms, domain commands."""
