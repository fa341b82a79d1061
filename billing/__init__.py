"""billing: the credits ledger of an LLM API gateway."""
