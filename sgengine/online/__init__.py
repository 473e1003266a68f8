"""Online self-guidance: prototypes clustered from the model's own features during training."""
