"""In-memory tier: profile model, events and routing (pure), shard actors and fleet (Ray)."""
