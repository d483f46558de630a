"""What both actors need: the model's types, the message protocol and its framing, config, logging."""
