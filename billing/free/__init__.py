"""Free-model requests (SPEC §5): per-account quotas of 20 a minute and 50 (or 1,000) a day, in Redis."""
