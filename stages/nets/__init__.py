"""Networks and their checkpoint loaders, separate from the stages that schedule them."""
