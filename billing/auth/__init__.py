"""Bearer tokens with scopes (SPEC §7): admin, support, gateway, and account-scoped tokens."""
