"""Customer accounts: balances, history, lots, staff grants and adjustments."""
