"""The ledger core: immutable value types and pure functions that build balanced entries. No I/O."""
