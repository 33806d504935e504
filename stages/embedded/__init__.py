"""The embedded backend: visemes from the speech's spectrum and a mesh warp of the portrait, with no model weights
and no torch."""
