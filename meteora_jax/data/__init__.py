"""Data: prompts and the token rules (`prompts`), task folders (`tasks`), samples to labelled tokens
and held-out prompts (`samples`), the Grain training-batch pipeline with packing (`pipeline`).

`pipeline` imports grain; the other modules do not, so generation stays light.
"""
