"""Training with truncated BPTT on top of biaskit (imports biaskit, never the reverse)."""
