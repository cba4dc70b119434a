"""Model parts: vision towers, projector, mask heads and the model that joins them."""
