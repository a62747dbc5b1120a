"""Client of ms-swift's ``swift rollout`` server (stage2.md §16.3): transport only, ms-swift's protocol classes."""
