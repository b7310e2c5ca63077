"""The toy model's world and its training: scene generator, procedural judge, training script."""
