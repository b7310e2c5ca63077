"""Core ML on a Mac: converting a model, split-einsum attention, compute units and their bench, hardware facts."""
