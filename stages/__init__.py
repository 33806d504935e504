"""Face-specific stages of talkstream; `stages.session` is the public API that wires them."""
