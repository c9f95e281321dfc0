"""The ingress: OpenAI API surface, errors and limits; delegates each request to an engine."""
