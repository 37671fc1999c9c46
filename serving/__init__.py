"""HTTP tier: the Ray Serve ingress (app), the recommender each replica holds, pure
ranking and the JSON views."""
