"""What an operator configures: the policy (egress, limits, git rules, image) and the host's settings."""
